// Package cmdline is what the example commands (cmd/masquerade-anonymize,
// cmd/masquerade-video) share: method names, flags that may follow the file
// arguments, the token file, and one mapping from an error to a message and an
// exit code.
//
// Exit codes: 0 done; 2 bad command line (or a file it names cannot be used);
// 3 INVALID_ARGUMENT (the gRPC code number); 1 any other failure.
package cmdline

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	pb "masquerade/clients/go/gen/masquerade/v1"
	"masquerade/clients/go/masquerade"
)

// Methods maps the --method names to the proto's values.
var Methods = map[string]pb.Method{
	"reverse_personalization": pb.Method_REVERSE_PERSONALIZATION,
	"blur":                    pb.Method_BLUR,
	"pixelate":                pb.Method_PIXELATE,
	"solid":                   pb.Method_SOLID,
}

// MethodHelp is the --method flag's help text.
const MethodHelp = "blur|pixelate|solid|reverse_personalization (default: the server's)"

// ParseMethod returns the method a --method name stands for; "" is the server's default.
func ParseMethod(name string) (pb.Method, error) {
	if name == "" {
		return pb.Method_METHOD_UNSPECIFIED, nil
	}
	if method, ok := Methods[name]; ok {
		return method, nil
	}
	names := make([]string, 0, len(Methods))
	for known := range Methods {
		names = append(names, known)
	}
	sort.Strings(names)
	return 0, fmt.Errorf("--method %s: use one of %s", name, strings.Join(names, ", "))
}

// Parse parses argv with fs and returns the positional arguments. The flag package
// stops at the first positional argument; Parse goes on past it, so options may
// follow the files.
func Parse(fs *flag.FlagSet, argv []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(argv); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return positional, nil
		}
		positional = append(positional, fs.Arg(0))
		argv = fs.Args()[1:]
	}
}

// UsageError is a failure of the command line or of a file it names (exit 2).
type UsageError struct{ Err error }

func (e UsageError) Error() string { return e.Err.Error() }
func (e UsageError) Unwrap() error { return e.Err }

// ReadToken returns the first non-empty line of the --token-file at path ("" for no path).
func ReadToken(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	text, err := os.ReadFile(path)
	if err != nil {
		return "", UsageError{fmt.Errorf("--token-file: %w", err)}
	}
	for _, line := range strings.Split(string(text), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			return line, nil
		}
	}
	return "", UsageError{fmt.Errorf("--token-file %s: the file holds no token", path)}
}

// DialError is masquerade.Dial's error as the commands report it: a client-side
// problem (an unreadable PEM file, a bad token) is a UsageError.
func DialError(err error) error {
	var merr *masquerade.Error
	if err != nil && !errors.As(err, &merr) {
		return UsageError{err}
	}
	return err
}

// ExitCode prints err (if any) to stderr and returns the command's exit code.
func ExitCode(err error) int {
	var merr *masquerade.Error
	var uerr UsageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &uerr):
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return 2
	case errors.As(err, &merr):
		fmt.Fprintf(os.Stderr, "error: %s: %s\n", merr.CodeName(), merr.Message)
		if errors.Is(err, masquerade.ErrInvalidArgument) {
			return 3
		}
		return 1
	default:
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return 1
	}
}

// ParseOrExit runs parse on the command's arguments: on -h it prints usage and
// exits 0, on a bad command line it prints the error and usage and exits 2.
func ParseOrExit[A any](parse func([]string) (A, error), usage string) A {
	a, err := parse(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		fmt.Println(usage)
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n%s\n", err, usage)
		os.Exit(2)
	}
	return a
}
