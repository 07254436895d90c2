package masquerade

import (
	"context"
	"fmt"
	"io"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	pb "masquerade/clients/go/gen/masquerade/v1"
)

// VideoChunkBytes is the upload chunk size: well under the 64 MiB message limit.
const VideoChunkBytes = 1 << 20

// AnonymizeVideo sends a whole video file through AnonymizeVideo: start (the
// options: set Filename so the server knows the container, and SizeBytes when
// known) and then src in chunks, read as they are sent, so a large clip is never
// held in memory. The anonymized file is written to dst as it arrives (in order;
// each chunk's offset is checked); every progress event goes to onProgress (may be
// nil). Returns the final report. The client's Timeout is the deadline of the whole
// call: upload, processing and download. A failure of the call is an *Error; an
// error writing dst or from onProgress cancels the call (the server then deletes
// its copy of the upload) and is returned as is.
func (c *Client) AnonymizeVideo(ctx context.Context, start *pb.VideoStart, src io.Reader, dst io.Writer, onProgress func(*pb.VideoProgress) error) (*pb.VideoReport, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	stream, err := c.Raw.AnonymizeVideo(ctx)
	if err != nil {
		return nil, fromError(err)
	}
	sendFailed := make(chan error, 1)
	go func() {
		fail := func(err error) {
			if err != io.EOF { // io.EOF: the call ended; Recv reports its status
				sendFailed <- err
				cancel()
			}
		}
		if err := stream.Send(&pb.AnonymizeVideoRequest{Part: &pb.AnonymizeVideoRequest_Start{Start: start}}); err != nil {
			fail(fromError(err))
			return
		}
		buffer := make([]byte, VideoChunkBytes)
		var offset uint64
		for {
			n, readErr := io.ReadFull(src, buffer)
			if n > 0 {
				chunk := &pb.VideoChunk{Offset: offset, Data: append([]byte(nil), buffer[:n]...)}
				if err := stream.Send(&pb.AnonymizeVideoRequest{Part: &pb.AnonymizeVideoRequest_Chunk{Chunk: chunk}}); err != nil {
					fail(fromError(err))
					return
				}
				offset += uint64(n)
			}
			if readErr == io.EOF || readErr == io.ErrUnexpectedEOF {
				break
			}
			if readErr != nil {
				fail(fmt.Errorf("reading the video: %w", readErr))
				return
			}
		}
		if err := stream.CloseSend(); err != nil {
			fail(fromError(err))
		}
	}()
	var received uint64
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return nil, &Error{Code: codes.Internal, Message: "the stream ended without a report"}
		}
		if err != nil {
			select {
			case sendErr := <-sendFailed: // the cause of the cancellation, rather than CANCELLED
				return nil, sendErr
			default:
				return nil, fromError(err)
			}
		}
		switch event := resp.Event.(type) {
		case *pb.AnonymizeVideoResponse_Progress:
			if onProgress != nil {
				if err := onProgress(event.Progress); err != nil {
					return nil, err
				}
			}
		case *pb.AnonymizeVideoResponse_Output:
			if event.Output.GetOffset() != received {
				return nil, &Error{Code: codes.Internal, Message: fmt.Sprintf("output chunk at %d, expected %d", event.Output.GetOffset(), received)}
			}
			if _, err := dst.Write(event.Output.GetData()); err != nil {
				return nil, err
			}
			received += uint64(len(event.Output.GetData()))
		case *pb.AnonymizeVideoResponse_Report:
			if event.Report.GetOutputBytes() != received {
				return nil, &Error{Code: codes.Internal, Message: fmt.Sprintf("received %d bytes, the report says %d", received, event.Report.GetOutputBytes())}
			}
			return event.Report, nil
		}
	}
}

// AnonymizeFrames streams live frames through AnonymizeFrames. options go in the
// first message; frames are sent as they come from the channel (close it to end
// the stream), each with its Sequence (strictly increasing) and Timestamp set by
// the caller. The server keeps at most options.Window frames in flight, so a slow
// onResult slows the reading of frames: nothing queues without bound. onResult
// gets every FrameResult in the order sent, on the caller's goroutine; an error
// from it cancels the stream and is returned as is. No deadline but ctx's: a live
// stream runs as long as its frames do.
func (c *Client) AnonymizeFrames(ctx context.Context, options *pb.FrameStreamOptions, frames <-chan *pb.FrameRequest, onResult func(*pb.FrameResult) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if c.opts.Token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.opts.Token)
	}
	stream, err := c.Raw.AnonymizeFrames(ctx)
	if err != nil {
		return fromError(err)
	}
	sendFailed := make(chan error, 1)
	go func() {
		first := true
		for frame := range frames {
			if first {
				frame.Options = options
				first = false
			}
			if err := stream.Send(frame); err != nil {
				if err != io.EOF {
					sendFailed <- fromError(err)
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
		result, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			select {
			case sendErr := <-sendFailed:
				return sendErr
			default:
				return fromError(err)
			}
		}
		if err := onResult(result); err != nil {
			return err
		}
	}
}
