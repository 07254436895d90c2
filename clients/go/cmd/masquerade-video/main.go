// Command masquerade-video sends one video file through AnonymizeVideo, prints
// each progress event as it arrives, writes the anonymized file (to a partial file
// renamed into place at the end, so a failed call leaves nothing) and prints the
// report: one line per track, then the summary.
//
//	masquerade-video --server HOST:PORT [--method blur] [--detect-every K] [--codec h264] [--crf N]
//	                 [--no-audio] [--keep-metadata] [--timeout SECONDS] INPUT_VIDEO OUTPUT_VIDEO
//
// Exit codes: 0 done; 3 INVALID_ARGUMENT (a bad, truncated or oversized file;
// the message names the problem); 2 bad command line (or an unusable --token-file
// or PEM file); 1 any other failure.
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

	"masquerade/clients/go/cmdline"
	pb "masquerade/clients/go/gen/masquerade/v1"
	"masquerade/clients/go/masquerade"
)

const usage = `usage: masquerade-video --server HOST:PORT [--method blur|pixelate|solid|reverse_personalization]
       [--detect-every K] [--codec h264|hevc|vp9|av1] [--crf N] [--no-audio] [--keep-metadata]
       [--timeout SECONDS] [--token-file FILE] [--tls] [--tls-ca PEM] INPUT_VIDEO OUTPUT_VIDEO`

type args struct {
	server, codec, tokenFile, tlsCA string
	method                          pb.Method
	detectEvery, crf                int
	noAudio, keepMetadata, tls      bool
	timeout                         float64
	input, output                   string
}

func parseArgs(argv []string) (args, error) {
	var a args
	var method string
	fs := flag.NewFlagSet("masquerade-video", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&a.server, "server", "", "HOST:PORT of the server")
	fs.StringVar(&method, "method", "", cmdline.MethodHelp)
	fs.IntVar(&a.detectEvery, "detect-every", 0, "run the detector on every K-th frame (default: the server's)")
	fs.StringVar(&a.codec, "codec", "", "h264|hevc|vp9|av1 (default h264)")
	fs.IntVar(&a.crf, "crf", -1, "encoder quality, lower is better (default: the server's)")
	fs.BoolVar(&a.noAudio, "no-audio", false, "drop the audio streams (by default copied as they are)")
	fs.BoolVar(&a.keepMetadata, "keep-metadata", false, "keep container and stream tags, except location")
	fs.Float64Var(&a.timeout, "timeout", 600, "deadline in seconds for upload, processing and download")
	fs.StringVar(&a.tokenFile, "token-file", "", "file whose first line is the bearer token")
	fs.BoolVar(&a.tls, "tls", false, "TLS with the system's CA roots")
	fs.StringVar(&a.tlsCA, "tls-ca", "", "PEM: the CA that signed the server's certificate (implies TLS)")
	positional, err := cmdline.Parse(fs, argv)
	if err != nil {
		return a, err
	}
	switch {
	case a.server == "":
		return a, errors.New("--server HOST:PORT is required")
	case len(positional) != 2:
		return a, errors.New("expected INPUT_VIDEO and OUTPUT_VIDEO")
	case a.timeout <= 0:
		return a, fmt.Errorf("--timeout %v: use a positive number of seconds", a.timeout)
	}
	if a.method, err = cmdline.ParseMethod(method); err != nil {
		return a, err
	}
	a.input, a.output = positional[0], positional[1]
	return a, nil
}

func startMessage(a args, size int64) *pb.VideoStart {
	sizeBytes := uint64(size)
	start := &pb.VideoStart{
		Filename:  filepath.Base(a.input),
		SizeBytes: &sizeBytes,
		Method:    a.method,
		Output:    &pb.VideoOutputOptions{Codec: a.codec, DropAudio: a.noAudio, KeepMetadata: a.keepMetadata},
	}
	if a.crf >= 0 {
		crf := uint32(a.crf)
		start.Output.Crf = &crf
	}
	if a.detectEvery > 0 {
		every := uint32(a.detectEvery)
		start.Tracking = &pb.TrackingOptions{DetectEvery: &every}
	}
	return start
}

func run(a args) error {
	input, err := os.Open(a.input)
	if err != nil {
		return err
	}
	defer input.Close()
	info, err := input.Stat()
	if err != nil {
		return err
	}
	token, err := cmdline.ReadToken(a.tokenFile)
	if err != nil {
		return err
	}
	client, err := masquerade.Dial(a.server, masquerade.Options{
		Timeout: time.Duration(a.timeout * float64(time.Second)),
		TLS:     a.tls,
		CAFile:  a.tlsCA,
		Token:   token,
	})
	if err != nil {
		return cmdline.DialError(err)
	}
	defer client.Close()
	partial := a.output + ".partial"
	output, err := os.Create(partial)
	if err != nil {
		return err
	}
	defer os.Remove(partial) // gone after the rename; removes a failed call's partial file
	report, err := client.AnonymizeVideo(context.Background(), startMessage(a, info.Size()), input, output,
		func(p *pb.VideoProgress) error {
			fmt.Printf("progress frames=%d/%d fps=%.1f tracks=%d\n", p.GetFramesDone(), p.GetFramesTotal(), p.GetFps(), p.GetTracks())
			return nil
		})
	if closeErr := output.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		return err
	}
	if err := os.Rename(partial, a.output); err != nil {
		return err
	}
	for _, t := range report.GetTracks() {
		fmt.Printf("track id=%d frames=%d-%d detected=%d filled=%d method=%s status=%s\n", t.GetTrackId(),
			t.GetFirstFrame(), t.GetLastFrame(), t.GetFramesDetected(), t.GetFramesFilled(), t.GetMethodApplied(), t.GetStatus())
	}
	fmt.Printf("report frames=%d tracks=%d complete=%t bytes=%d\n", report.GetFrames(), len(report.GetTracks()),
		report.GetComplete(), report.GetOutputBytes())
	return nil
}

func main() {
	os.Exit(cmdline.ExitCode(run(cmdline.ParseOrExit(parseArgs, usage))))
}
