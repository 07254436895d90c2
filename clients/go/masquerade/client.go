// Package masquerade is a thin Go client for the Masquerade anonymization server,
// over the stub generated from proto/ (package masqueradev1, built by
// clients/go/build.sh): one deadline per call across all its attempts, retries
// of UNAVAILABLE with exponential backoff before any response arrived, and *Error
// for every failure.
package masquerade

import (
	"context"
	"io"
	"math/rand"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	pb "masquerade/clients/go/gen/masquerade/v1"
)

// Options of a Client; zero fields take the defaults below.
type Options struct {
	// Timeout is the deadline of each call, all attempts together, unless ctx has an
	// earlier one. Default 300 s.
	Timeout time.Duration
	// MaxAttempts counts the first attempt. Default 4.
	MaxAttempts    int
	InitialBackoff time.Duration // default 200 ms, doubled per retry
	MaxBackoff     time.Duration // default 5 s
}

func (o Options) withDefaults() Options {
	if o.Timeout <= 0 {
		o.Timeout = 300 * time.Second
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 4
	}
	if o.InitialBackoff <= 0 {
		o.InitialBackoff = 200 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 5 * time.Second
	}
	return o
}

// Client calls one Masquerade server. It is safe for concurrent use.
type Client struct {
	conn *grpc.ClientConn
	// Raw is the generated stub, for calls this wrapper does not cover.
	Raw  pb.AnonymizerClient
	opts Options
}

// Dial connects lazily to target ("host:port"). Without dialOpts the channel is
// plaintext, as the server listens on loopback or behind a proxy.
func Dial(target string, opts Options, dialOpts ...grpc.DialOption) (*Client, error) {
	if len(dialOpts) == 0 {
		dialOpts = []grpc.DialOption{grpc.WithInsecure()}
	}
	// Results are whole encoded images, larger than gRPC's 4 MiB default; 64 MiB matches the server.
	dialOpts = append(dialOpts, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	conn, err := grpc.Dial(target, dialOpts...)
	if err != nil {
		return nil, fromError(err)
	}
	return &Client{conn: conn, Raw: pb.NewAnonymizerClient(conn), opts: opts.withDefaults()}, nil
}

// Close releases the channel.
func (c *Client) Close() error { return c.conn.Close() }

// AnonymizeStream sends one image through AnonymizeStream, passes every event
// (queued, faces found, progress, result) to onEvent as it arrives, and returns
// the result. An error from onEvent cancels the call and is returned as is; any
// other failure is an *Error.
func (c *Client) AnonymizeStream(ctx context.Context, req *pb.AnonymizeRequest, onEvent func(*pb.AnonymizeEvent) error) (*pb.AnonymizeResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		result, received, err := c.streamOnce(ctx, req, onEvent)
		if err == nil {
			return result, nil
		}
		merr, isRPC := err.(*Error)
		// Once an event arrived the server has the job; a retry would run it twice.
		if !isRPC || received || !c.backoffBeforeRetry(ctx, merr, attempt) {
			return nil, err
		}
	}
}

func (c *Client) streamOnce(ctx context.Context, req *pb.AnonymizeRequest, onEvent func(*pb.AnonymizeEvent) error) (*pb.AnonymizeResponse, bool, error) {
	ctx, cancel := context.WithCancel(ctx) // frees the server's slot if onEvent gives up
	defer cancel()
	stream, err := c.Raw.AnonymizeStream(ctx, req)
	if err != nil {
		return nil, false, fromError(err)
	}
	received := false
	for {
		event, err := stream.Recv()
		if err == io.EOF {
			return nil, received, &Error{Code: codes.Internal, Message: "the stream ended without a result event"}
		}
		if err != nil {
			return nil, received, fromError(err)
		}
		received = true
		if onEvent != nil {
			if err := onEvent(event); err != nil {
				return nil, received, err
			}
		}
		if result := event.GetResult(); result != nil {
			return result, received, nil
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
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel() // ends the call, and with it the sender, on every early return
	stream, err := c.Raw.AnonymizeBatch(ctx)
	if err != nil {
		return fromError(err)
	}
	sendFailed := make(chan error, 1) // buffered: the sender never waits on a receiver that left
	go func() {
		for _, req := range requests {
			if err := stream.Send(req); err != nil {
				if err != io.EOF { // io.EOF: the call ended; Recv below reports its status
					sendFailed <- fromError(err) // e.g. a request that cannot be encoded
					cancel()
				}
				return
			}
		}
		if err := stream.CloseSend(); err != nil {
			sendFailed <- fromError(err)
			cancel()
		}
	}()
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			select {
			case sendErr := <-sendFailed: // the cause of the cancellation, rather than CANCELLED
				return sendErr
			default:
				return fromError(err)
			}
		}
		if onResponse != nil {
			if err := onResponse(resp); err != nil {
				return err
			}
		}
	}
}

// GetServerInfo returns the version, methods available, models loaded, limits and defaults.
func (c *Client) GetServerInfo(ctx context.Context) (*pb.ServerInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		info, err := c.Raw.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
		if err == nil {
			return info, nil
		}
		merr := fromError(err)
		if !c.backoffBeforeRetry(ctx, merr, attempt) {
			return nil, merr
		}
	}
}

// backoffBeforeRetry sleeps before the next attempt and returns true, or returns
// false when err is final.
func (c *Client) backoffBeforeRetry(ctx context.Context, err *Error, attempt int) bool {
	if err.Code != codes.Unavailable || attempt >= c.opts.MaxAttempts {
		return false
	}
	ceiling := c.opts.InitialBackoff << (attempt - 1)
	if ceiling > c.opts.MaxBackoff || ceiling <= 0 {
		ceiling = c.opts.MaxBackoff
	}
	// Jitter, so clients that failed together do not retry together.
	delay := ceiling/2 + time.Duration(rand.Int63n(int64(ceiling/2)+1))
	if deadline, ok := ctx.Deadline(); ok && time.Now().Add(delay).After(deadline) {
		return false
	}
	timer := time.NewTimer(delay)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}
