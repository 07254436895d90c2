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
	var received uint64
	var report *pb.VideoReport
	ended, err := duplex[*pb.AnonymizeVideoRequest, *pb.AnonymizeVideoResponse](stream, cancel,
		func(send func(*pb.AnonymizeVideoRequest) error) error {
			if err := send(&pb.AnonymizeVideoRequest{Part: &pb.AnonymizeVideoRequest_Start{Start: start}}); err != nil {
				return err
			}
			buffer := make([]byte, VideoChunkBytes)
			var offset uint64
			for {
				n, readErr := io.ReadFull(src, buffer)
				if n > 0 {
					chunk := &pb.VideoChunk{Offset: offset, Data: append([]byte(nil), buffer[:n]...)}
					if err := send(&pb.AnonymizeVideoRequest{Part: &pb.AnonymizeVideoRequest_Chunk{Chunk: chunk}}); err != nil {
						return err
					}
					offset += uint64(n)
				}
				if readErr == io.EOF || readErr == io.ErrUnexpectedEOF {
					return nil
				}
				if readErr != nil {
					return fmt.Errorf("reading the video: %w", readErr)
				}
			}
		},
		func(resp *pb.AnonymizeVideoResponse) (bool, error) {
			switch event := resp.Event.(type) {
			case *pb.AnonymizeVideoResponse_Progress:
				if onProgress != nil {
					return false, onProgress(event.Progress)
				}
			case *pb.AnonymizeVideoResponse_Output:
				if event.Output.GetOffset() != received {
					return false, &Error{Code: codes.Internal, Message: fmt.Sprintf("output chunk at %d, expected %d", event.Output.GetOffset(), received)}
				}
				if _, err := dst.Write(event.Output.GetData()); err != nil {
					return false, err
				}
				received += uint64(len(event.Output.GetData()))
			case *pb.AnonymizeVideoResponse_Report:
				if event.Report.GetOutputBytes() != received {
					return false, &Error{Code: codes.Internal, Message: fmt.Sprintf("received %d bytes, the report says %d", received, event.Report.GetOutputBytes())}
				}
				report = event.Report
				return true, nil
			}
			return false, nil
		})
	if err != nil {
		return nil, err
	}
	if ended {
		return nil, &Error{Code: codes.Internal, Message: "the stream ended without a report"}
	}
	return report, nil
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
	_, err = duplex[*pb.FrameRequest, *pb.FrameResult](stream, cancel,
		func(send func(*pb.FrameRequest) error) error {
			first := true
			for frame := range frames {
				if first {
					frame.Options = options
					first = false
				}
				if err := send(frame); err != nil {
					return err
				}
			}
			return nil
		},
		func(result *pb.FrameResult) (bool, error) { return false, onResult(result) })
	return err
}
