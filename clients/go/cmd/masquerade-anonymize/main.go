// Command masquerade-anonymize sends one image through AnonymizeStream, prints
// each event as it arrives and writes the anonymized image.
//
// Exit codes: 0 done; 3 INVALID_ARGUMENT (the gRPC code number); 2 bad command
// line; 1 any other failure.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"masquerade/clients/go/masquerade"
	pb "masquerade/clients/go/gen/masquerade/v1"
)

const usage = `usage: masquerade-anonymize --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]
       [--aligned] [--steps N] [--timeout SECONDS] INPUT_IMAGE OUTPUT_IMAGE`

var methods = map[string]pb.Method{
	"reverse_personalization": pb.Method_REVERSE_PERSONALIZATION,
	"blur":                    pb.Method_BLUR,
	"pixelate":                pb.Method_PIXELATE,
	"solid":                   pb.Method_SOLID,
}

type args struct {
	server  string
	method  string
	aligned bool
	steps   uint
	timeout float64
	input   string
	output  string
}

func parseArgs(argv []string) (args, error) {
	var a args
	fs := flag.NewFlagSet("masquerade-anonymize", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&a.server, "server", "", "HOST:PORT of the server")
	fs.StringVar(&a.method, "method", "", "blur|pixelate|solid|reverse_personalization (default: the server's)")
	fs.BoolVar(&a.aligned, "aligned", false, "the image is one aligned face; skip detection")
	fs.UintVar(&a.steps, "steps", 0, "diffusion steps (default: the server's)")
	fs.Float64Var(&a.timeout, "timeout", 300, "deadline in seconds, retries included")
	// flag stops at the first positional argument; go on past it so options may follow the files.
	var positional []string
	for {
		if err := fs.Parse(argv); err != nil {
			return a, err
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		argv = fs.Args()[1:]
	}
	switch {
	case a.server == "":
		return a, errors.New("--server HOST:PORT is required")
	case len(positional) != 2:
		return a, errors.New("expected INPUT_IMAGE and OUTPUT_IMAGE")
	case a.timeout <= 0:
		return a, fmt.Errorf("--timeout %v: use a positive number of seconds", a.timeout)
	}
	if _, ok := methods[a.method]; a.method != "" && !ok {
		names := make([]string, 0, len(methods))
		for name := range methods {
			names = append(names, name)
		}
		sort.Strings(names)
		return a, fmt.Errorf("--method %s: use one of %s", a.method, strings.Join(names, ", "))
	}
	a.input, a.output = positional[0], positional[1]
	return a, nil
}

func describe(event *pb.AnonymizeEvent) string {
	switch e := event.Event.(type) {
	case *pb.AnonymizeEvent_Queued:
		return fmt.Sprintf("queued position=%d", e.Queued.GetPosition())
	case *pb.AnonymizeEvent_FacesFound:
		return fmt.Sprintf("faces_found n=%d", len(e.FacesFound.GetBoxes()))
	case *pb.AnonymizeEvent_Progress:
		p := e.Progress
		return fmt.Sprintf("progress phase=%s step=%d/%d", p.GetPhase(), p.GetStep(), p.GetTotal())
	case *pb.AnonymizeEvent_Result:
		r := e.Result
		return fmt.Sprintf("result faces=%d complete=%t bytes=%d", len(r.GetFaces()), r.GetComplete(), len(r.GetImage()))
	}
	return "unknown_event"
}

func run(a args) error {
	image, err := os.ReadFile(a.input)
	if err != nil {
		return err
	}
	req := &pb.AnonymizeRequest{Image: image, Method: methods[a.method]}
	if a.steps > 0 {
		steps := uint32(a.steps)
		req.Params = &pb.ReversePersonalizationParams{Steps: &steps}
	}
	if a.aligned {
		req.Detection = &pb.DetectionOptions{Aligned: true}
	}
	client, err := masquerade.Dial(a.server, masquerade.Options{Timeout: time.Duration(a.timeout * float64(time.Second))})
	if err != nil {
		return err
	}
	defer client.Close()
	result, err := client.AnonymizeStream(context.Background(), req, func(event *pb.AnonymizeEvent) error {
		fmt.Println(describe(event))
		return nil
	})
	if err != nil {
		return err
	}
	return os.WriteFile(a.output, result.GetImage(), 0o644)
}

func main() {
	a, err := parseArgs(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		fmt.Println(usage)
		return
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n%s\n", err, usage)
		os.Exit(2)
	}
	err = run(a)
	var merr *masquerade.Error
	switch {
	case err == nil:
	case errors.As(err, &merr):
		fmt.Fprintf(os.Stderr, "error: %s: %s\n", merr.CodeName(), merr.Message)
		if errors.Is(err, masquerade.ErrInvalidArgument) {
			os.Exit(3)
		}
		os.Exit(1)
	default:
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
}
