// Command masquerade-anonymize sends one image through AnonymizeStream, prints
// each event as it arrives and writes the anonymized image. With --batch it sends
// every input over one AnonymizeBatch stream (request_id = the input's file name),
// prints one line per response as it arrives and writes each result to
// OUTPUT_DIR/<file name>.
//
// Exit codes: 0 done (with --batch: every image); 3 INVALID_ARGUMENT (the gRPC
// code number; with --batch: some image was, and nothing failed otherwise); 2 bad
// command line; 1 any other failure.
package main

import (
	// First: grpc-go before 1.40 reads GRPC_GO_RETRY when it initializes (see the package).
	_ "masquerade/clients/go/retryenv"

	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc/codes"

	"masquerade/clients/go/cmdline"
	pb "masquerade/clients/go/gen/masquerade/v1"
	"masquerade/clients/go/masquerade"
)

const usage = `usage: masquerade-anonymize --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]
       [--aligned] [--steps N] [--timeout SECONDS]
       [--tls] [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--token-file FILE] INPUT_IMAGE OUTPUT_IMAGE
       masquerade-anonymize --batch --server HOST:PORT [options as above] INPUT_IMAGE... OUTPUT_DIR`

type args struct {
	server    string
	method    pb.Method
	aligned   bool
	steps     uint
	timeout   float64
	batch     bool
	tls       bool
	tlsCA     string
	tlsCert   string
	tlsKey    string
	tokenFile string
	inputs    []string
	output    string // the output image, or with --batch the output directory
}

func parseArgs(argv []string) (args, error) {
	var a args
	var method string
	fs := flag.NewFlagSet("masquerade-anonymize", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&a.server, "server", "", "HOST:PORT of the server")
	fs.StringVar(&method, "method", "", cmdline.MethodHelp)
	fs.BoolVar(&a.aligned, "aligned", false, "the image is one aligned face; skip detection")
	fs.UintVar(&a.steps, "steps", 0, "diffusion steps (default: the server's)")
	fs.Float64Var(&a.timeout, "timeout", 300, "deadline in seconds, retries included")
	fs.BoolVar(&a.batch, "batch", false, "send every INPUT_IMAGE over one AnonymizeBatch stream into OUTPUT_DIR")
	fs.BoolVar(&a.tls, "tls", false, "TLS with the system's CA roots")
	fs.StringVar(&a.tlsCA, "tls-ca", "", "PEM: the CA that signed the server's certificate (implies TLS)")
	fs.StringVar(&a.tlsCert, "tls-cert", "", "PEM: this client's certificate, for mutual TLS")
	fs.StringVar(&a.tlsKey, "tls-key", "", "PEM: this client's private key, for mutual TLS")
	fs.StringVar(&a.tokenFile, "token-file", "", "file whose first line is the bearer token")
	positional, err := cmdline.Parse(fs, argv)
	if err != nil {
		return a, err
	}
	switch {
	case a.server == "":
		return a, errors.New("--server HOST:PORT is required")
	case a.batch && len(positional) < 2:
		return a, errors.New("--batch: expected INPUT_IMAGE... OUTPUT_DIR")
	case !a.batch && len(positional) != 2:
		return a, errors.New("expected INPUT_IMAGE and OUTPUT_IMAGE")
	case (a.tlsCert == "") != (a.tlsKey == ""):
		return a, errors.New("--tls-cert and --tls-key: give both (mutual TLS) or neither")
	case a.timeout <= 0:
		return a, fmt.Errorf("--timeout %v: use a positive number of seconds", a.timeout)
	}
	if a.method, err = cmdline.ParseMethod(method); err != nil {
		return a, err
	}
	a.inputs, a.output = positional[:len(positional)-1], positional[len(positional)-1]
	seen := map[string]bool{}
	for _, input := range a.inputs {
		name := filepath.Base(input)
		if a.batch && seen[name] {
			return a, fmt.Errorf("--batch: two inputs are named %s; file names are the request ids and output names", name)
		}
		seen[name] = true
	}
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

func describeBatch(resp *pb.AnonymizeBatchResponse) string {
	switch o := resp.Outcome.(type) {
	case *pb.AnonymizeBatchResponse_Result:
		r := o.Result
		return fmt.Sprintf("batch id=%s faces=%d complete=%t bytes=%d", resp.GetRequestId(), len(r.GetFaces()), r.GetComplete(), len(r.GetImage()))
	case *pb.AnonymizeBatchResponse_Error:
		return fmt.Sprintf("batch id=%s error=%s: %s", resp.GetRequestId(), masquerade.CodeName(codes.Code(o.Error.GetCode())), o.Error.GetMessage())
	}
	return fmt.Sprintf("batch id=%s error=INTERNAL: the response has neither result nor error", resp.GetRequestId())
}

// newRequest builds the request the options describe, for image.
func newRequest(a args, id string, image []byte) *pb.AnonymizeRequest {
	req := &pb.AnonymizeRequest{RequestId: id, Image: image, Method: a.method}
	if a.steps > 0 {
		steps := uint32(a.steps)
		req.Params = &pb.ReversePersonalizationParams{Steps: &steps}
	}
	if a.aligned {
		req.Detection = &pb.DetectionOptions{Aligned: true}
	}
	return req
}

func dial(a args) (*masquerade.Client, error) {
	token, err := cmdline.ReadToken(a.tokenFile)
	if err != nil {
		return nil, err
	}
	client, err := masquerade.Dial(a.server, masquerade.Options{
		Timeout:  time.Duration(a.timeout * float64(time.Second)),
		TLS:      a.tls,
		CAFile:   a.tlsCA,
		CertFile: a.tlsCert,
		KeyFile:  a.tlsKey,
		Token:    token,
	})
	return client, cmdline.DialError(err)
}

func run(a args) error {
	image, err := os.ReadFile(a.inputs[0])
	if err != nil {
		return err
	}
	client, err := dial(a)
	if err != nil {
		return err
	}
	defer client.Close()
	result, err := client.AnonymizeStream(context.Background(), newRequest(a, "", image), func(event *pb.AnonymizeEvent) error {
		fmt.Println(describe(event))
		return nil
	})
	if err != nil {
		return err
	}
	return os.WriteFile(a.output, result.GetImage(), 0o644)
}

// runBatch returns the exit code once the stream ended, or the error that ended it.
func runBatch(a args) (int, error) {
	requests := make([]*pb.AnonymizeRequest, 0, len(a.inputs))
	pending := map[string]bool{}
	for _, input := range a.inputs {
		image, err := os.ReadFile(input)
		if err != nil {
			return 1, err
		}
		id := filepath.Base(input)
		requests = append(requests, newRequest(a, id, image))
		pending[id] = true
	}
	if err := os.MkdirAll(a.output, 0o755); err != nil {
		return 1, err
	}
	client, err := dial(a)
	if err != nil {
		return 1, err
	}
	defer client.Close()
	invalid, failed := false, false
	err = client.AnonymizeBatch(context.Background(), requests, func(resp *pb.AnonymizeBatchResponse) error {
		fmt.Println(describeBatch(resp))
		id := resp.GetRequestId()
		switch {
		case !pending[id]:
			fmt.Fprintf(os.Stderr, "error: a response for an unknown or already answered request id %q\n", id)
			failed = true
		case resp.GetResult() != nil:
			if err := os.WriteFile(filepath.Join(a.output, id), resp.GetResult().GetImage(), 0o644); err != nil {
				fmt.Fprintf(os.Stderr, "error: %v\n", err)
				failed = true
			}
		case codes.Code(resp.GetError().GetCode()) == codes.InvalidArgument:
			invalid = true
		default:
			failed = true
		}
		delete(pending, id)
		return nil
	})
	if err != nil {
		return 1, err
	}
	for _, input := range a.inputs {
		if id := filepath.Base(input); pending[id] {
			fmt.Fprintf(os.Stderr, "error: no response for request id %s\n", id)
			failed = true
		}
	}
	switch {
	case failed:
		return 1, nil
	case invalid:
		return 3, nil
	}
	return 0, nil
}

func main() {
	a := cmdline.ParseOrExit(parseArgs, usage)
	if a.batch {
		code, err := runBatch(a)
		if err != nil {
			code = cmdline.ExitCode(err)
		}
		os.Exit(code)
	}
	os.Exit(cmdline.ExitCode(run(a)))
}
