package masquerade

import (
	"context"
	"io"
)

// duplexStream is what the generated client side of a bidirectional RPC offers.
type duplexStream[Req, Resp any] interface {
	Send(Req) error
	Recv() (Resp, error)
	CloseSend() error
}

// duplex runs one bidirectional call (AnonymizeBatch, AnonymizeVideo,
// AnonymizeFrames). send writes the requests through its argument on its own
// goroutine, so flow control never blocks sending on receiving; the client's half
// is closed after it returns nil. Responses go to onResponse on the caller's
// goroutine, never concurrently, until it returns stop or an error, or the server
// ends the stream (then ended is true).
//
// A send that fails cancels the call (cancel), and its error is returned in place
// of the CANCELLED that Recv then reports; io.EOF from Send only means the call
// has ended, and Recv reports its status.
func duplex[Req, Resp any](
	stream duplexStream[Req, Resp],
	cancel context.CancelFunc,
	send func(sendOne func(Req) error) error,
	onResponse func(Resp) (stop bool, err error),
) (ended bool, err error) {
	sendFailed := make(chan error, 1) // buffered: the sender never waits on a receiver that left
	go func() {
		err := send(func(req Req) error {
			if err := stream.Send(req); err != nil {
				if err == io.EOF {
					return io.EOF
				}
				return fromError(err) // e.g. a request that cannot be encoded
			}
			return nil
		})
		if err == nil {
			if err = stream.CloseSend(); err != nil {
				err = fromError(err)
			}
		}
		if err != nil && err != io.EOF {
			sendFailed <- err
			cancel()
		}
	}()
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return true, nil
		}
		if err != nil {
			select {
			case sendErr := <-sendFailed: // the cause of the cancellation, rather than CANCELLED
				return false, sendErr
			default:
				return false, fromError(err)
			}
		}
		if stop, err := onResponse(resp); stop || err != nil {
			return false, err
		}
	}
}
