// Package masquerade is a thin Go client for the Masquerade anonymization server,
// over the stub generated from proto/ (package masqueradev1, built by
// clients/go/build.sh): one deadline per call, retries of UNAVAILABLE by gRPC
// itself (the channel's service config: the same retryPolicy as the Python,
// TypeScript and C++ clients), TLS / mutual TLS and a bearer token from Options,
// RESOURCE_EXHAUSTED with RetryInfo retried after the server's delay, and *Error
// for every failure.
//
// grpc-go before 1.40 applies a retryPolicy only with GRPC_GO_RETRY=on set before
// it initializes: import _ "masquerade/clients/go/retryenv" first in package main
// (the example does).
package masquerade

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	pb "masquerade/clients/go/gen/masquerade/v1"
)

// ServiceConfig is gRPC's retryPolicy for UNAVAILABLE, the project's one policy in
// all four clients: 4 attempts in all, backoff 0.2 s doubling to at most 5 s (gRPC
// waits a random time up to that), only before any response arrived and never past
// the call's deadline. AnonymizeBatch is not retried: the server may already be
// running what was sent.
const ServiceConfig = `{"methodConfig": [
  {"name": [{"service": "masquerade.v1.Anonymizer"}],
   "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "5s", "backoffMultiplier": 2,
                   "retryableStatusCodes": ["UNAVAILABLE"]}},
  {"name": [{"service": "masquerade.v1.Anonymizer", "method": "AnonymizeBatch"}]}]}`

// Options of a Client; zero fields take the defaults.
type Options struct {
	// Timeout is the deadline of each call, retries included, unless ctx has an
	// earlier one. Default 300 s.
	Timeout time.Duration
	// CAFile is the PEM file of the CA that signed the server's certificate; it
	// implies TLS. TLS alone uses the system's roots.
	CAFile string
	TLS    bool
	// CertFile and KeyFile are this client's PEM certificate and key, for servers
	// that require mutual TLS.
	CertFile string
	KeyFile  string
	// Token is sent as "authorization: Bearer <token>" metadata on every call.
	Token string
	// RetryInfoAttempts is the attempts in all for an answer RESOURCE_EXHAUSTED that
	// carries a google.rpc.RetryInfo (a per-client quota, the queue): the client
	// waits the server's delay and sends again, the same in all four clients, only
	// before the first event, never past the deadline and never for a delay over
	// MaxRetryDelay (then the *Error, whose RetryDelay holds the advice, is
	// returned). Default 4; 1 never retries.
	RetryInfoAttempts int
}

// MaxRetryDelay is the longest RetryInfo delay a client waits before retrying by itself.
const MaxRetryDelay = 30 * time.Second

func (o Options) withDefaults() Options {
	if o.Timeout <= 0 {
		o.Timeout = 300 * time.Second
	}
	if o.RetryInfoAttempts <= 0 {
		o.RetryInfoAttempts = 4
	}
	return o
}

// TransportCredentials returns the TLS credentials the options ask for, or nil
// for plaintext (no CAFile, no CertFile, TLS false).
func (o Options) TransportCredentials() (credentials.TransportCredentials, error) {
	if (o.CertFile == "") != (o.KeyFile == "") {
		return nil, errors.New("CertFile and KeyFile: give both (mutual TLS) or neither")
	}
	if o.CAFile == "" && o.CertFile == "" && !o.TLS {
		return nil, nil
	}
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.CAFile != "" {
		pem, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("CAFile: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("CAFile %s: no PEM certificate in it", o.CAFile)
		}
		config.RootCAs = pool
	}
	if o.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("CertFile/KeyFile: %w", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return credentials.NewTLS(config), nil
}

// Client calls one Masquerade server. It is safe for concurrent use.
type Client struct {
	conn *grpc.ClientConn
	// Raw is the generated stub, for calls this wrapper does not cover.
	Raw  pb.AnonymizerClient
	opts Options
}

// Dial connects lazily to target ("host:port"), with TLS and a token as opts say
// (plaintext by default, for a server on loopback). dialOpts come last and may
// override any of them.
func Dial(target string, opts Options, dialOpts ...grpc.DialOption) (*Client, error) {
	opts = opts.withDefaults()
	if token := strings.TrimSpace(opts.Token); opts.Token != "" && (token == "" || strings.ContainsAny(token, " \t\r\n")) {
		return nil, errors.New("Token: empty or holds whitespace")
	}
	opts.Token = strings.TrimSpace(opts.Token)
	creds, err := opts.TransportCredentials()
	if err != nil {
		return nil, err
	}
	transport := grpc.WithInsecure()
	if creds != nil {
		transport = grpc.WithTransportCredentials(creds)
	}
	all := []grpc.DialOption{
		transport,
		grpc.WithDefaultServiceConfig(ServiceConfig),
		// Results are whole encoded images, larger than gRPC's 4 MiB default; 64 MiB matches the server.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20)),
	}
	conn, err := grpc.Dial(target, append(all, dialOpts...)...)
	if err != nil {
		return nil, fromError(err)
	}
	return &Client{conn: conn, Raw: pb.NewAnonymizerClient(conn), opts: opts}, nil
}

// callContext applies the deadline and the bearer token.
func (c *Client) callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if c.opts.Token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.opts.Token)
	}
	return context.WithTimeout(ctx, c.opts.Timeout)
}

// Close releases the channel.
func (c *Client) Close() error { return c.conn.Close() }

// AnonymizeStream sends one image through AnonymizeStream, passes every event
// (queued, faces found, progress, result) to onEvent as it arrives, and returns
// the result. An error from onEvent cancels the call and is returned as is; any
// other failure is an *Error.
func (c *Client) AnonymizeStream(ctx context.Context, req *pb.AnonymizeRequest, onEvent func(*pb.AnonymizeEvent) error) (*pb.AnonymizeResponse, error) {
	ctx, cancel := c.callContext(ctx) // cancel also frees the server's slot if onEvent gives up
	defer cancel()
	for attempt := 1; ; attempt++ {
		result, started, err := c.anonymizeStreamOnce(ctx, req, onEvent)
		if err == nil || started {
			return result, err
		}
		wait, retry := c.waitBeforeRetry(ctx, err, attempt)
		if !retry {
			return nil, err
		}
		select { // the server's RetryInfo delay
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, err
		}
	}
}

// waitBeforeRetry says whether to send again after attempt failed with err, and after how long.
func (c *Client) waitBeforeRetry(ctx context.Context, err error, attempt int) (time.Duration, bool) {
	var merr *Error
	if !errors.As(err, &merr) || merr.Code != codes.ResourceExhausted || attempt >= c.opts.RetryInfoAttempts {
		return 0, false
	}
	delay, ok := merr.RetryDelay()
	if !ok || delay > MaxRetryDelay {
		return 0, false
	}
	if deadline, has := ctx.Deadline(); has && delay >= time.Until(deadline) {
		return 0, false
	}
	return delay, true
}

// anonymizeStreamOnce is one AnonymizeStream call; started is true once an event arrived.
func (c *Client) anonymizeStreamOnce(ctx context.Context, req *pb.AnonymizeRequest, onEvent func(*pb.AnonymizeEvent) error) (*pb.AnonymizeResponse, bool, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.Raw.AnonymizeStream(ctx, req)
	if err != nil {
		return nil, false, fromError(err)
	}
	for started := false; ; started = true {
		event, err := stream.Recv()
		if err == io.EOF {
			return nil, true, &Error{Code: codes.Internal, Message: "the stream ended without a result event"}
		}
		if err != nil {
			return nil, started, fromError(err)
		}
		if onEvent != nil {
			if err := onEvent(event); err != nil {
				return nil, true, err
			}
		}
		if result := event.GetResult(); result != nil {
			return result, true, nil
		}
	}
}

// Anonymize is AnonymizeStream without the events.
func (c *Client) Anonymize(ctx context.Context, req *pb.AnonymizeRequest) (*pb.AnonymizeResponse, error) {
	return c.AnonymizeStream(ctx, req, nil)
}

// AnonymizeBatch sends requests over one AnonymizeBatch stream and passes each
// response to onResponse as it arrives, in completion order, not submission
// order: match them by RequestId, which every request must set, unique among the
// requests in flight. A request the server rejects is a response whose Error is
// set (Code is a gRPC code number, codes.Code(resp.GetError().GetCode())); the
// stream goes on. The requests are sent on a goroutine while responses are
// received, so flow control never blocks one on the other; the send side is
// closed after the last one. The client's Timeout is the deadline of the whole
// stream; the call is not retried, as the server may already run what was sent.
// A failure of the call is an *Error; an error from onResponse cancels the call
// (and every request still running on it) and is returned as is. onResponse is
// called from the caller's goroutine, never concurrently. requests must not be
// nil nor be changed before AnonymizeBatch returns.
func (c *Client) AnonymizeBatch(ctx context.Context, requests []*pb.AnonymizeRequest, onResponse func(*pb.AnonymizeBatchResponse) error) error {
	ctx, cancel := c.callContext(ctx)
	defer cancel() // ends the call, and with it the sender, on every early return
	stream, err := c.Raw.AnonymizeBatch(ctx)
	if err != nil {
		return fromError(err)
	}
	_, err = duplex[*pb.AnonymizeRequest, *pb.AnonymizeBatchResponse](stream, cancel,
		func(send func(*pb.AnonymizeRequest) error) error {
			for _, req := range requests {
				if err := send(req); err != nil {
					return err
				}
			}
			return nil
		},
		func(resp *pb.AnonymizeBatchResponse) (bool, error) {
			if onResponse == nil {
				return false, nil
			}
			return false, onResponse(resp)
		})
	return err
}

// GetServerInfo returns the version, methods available, models loaded, limits and defaults.
func (c *Client) GetServerInfo(ctx context.Context) (*pb.ServerInfo, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	info, err := c.Raw.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
	if err != nil {
		return nil, fromError(err)
	}
	return info, nil
}
