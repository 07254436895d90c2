package masquerade

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is a failed Masquerade call: the gRPC status the server (or the channel)
// answered with. Match a kind with errors.Is(err, masquerade.ErrInvalidArgument),
// read the details with errors.As(err, &merr), or get the *status.Status back
// with status.FromError(err).
type Error struct {
	Code    codes.Code
	Message string
	status  *status.Status
}

// Sentinels for errors.Is; they compare by code only.
var (
	ErrInvalidArgument    = &Error{Code: codes.InvalidArgument}    // the request names the bad field
	ErrResourceExhausted  = &Error{Code: codes.ResourceExhausted}  // the server's queue is full; try later
	ErrFailedPrecondition = &Error{Code: codes.FailedPrecondition} // e.g. REVERSE_PERSONALIZATION without weights
	ErrDeadlineExceeded   = &Error{Code: codes.DeadlineExceeded}
	ErrUnavailable        = &Error{Code: codes.Unavailable} // still unavailable after the retries
	ErrCanceled           = &Error{Code: codes.Canceled}
	ErrInternal           = &Error{Code: codes.Internal}
)

// CodeName is the canonical name of the code, e.g. "INVALID_ARGUMENT".
func (e *Error) CodeName() string { return CodeName(e.Code) }

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.CodeName(), e.Message) }

// RetryDelay is how long the server asked the caller to wait before retrying
// (the google.rpc.RetryInfo detail of RESOURCE_EXHAUSTED: a per-client quota,
// the queue); ok is false when the status carries no such advice.
func (e *Error) RetryDelay() (delay time.Duration, ok bool) {
	if e.status == nil {
		return 0, false
	}
	for _, detail := range e.status.Details() {
		if info, isRetryInfo := detail.(*errdetails.RetryInfo); isRetryInfo {
			d := info.GetRetryDelay()
			delay = time.Duration(d.GetSeconds())*time.Second + time.Duration(d.GetNanos())
			if delay < 0 {
				delay = 0
			}
			return delay, true
		}
	}
	return 0, false
}

// GRPCStatus lets status.FromError and status.Code see through the wrapper.
func (e *Error) GRPCStatus() *status.Status {
	if e.status == nil {
		return status.New(e.Code, e.Message)
	}
	return e.status
}

// Is reports whether target is an *Error with the same code (the sentinels above).
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Code == e.Code
}

// fromError turns any error a call returned into an *Error.
func fromError(err error) *Error {
	if err == nil {
		return nil
	}
	var merr *Error
	if errors.As(err, &merr) {
		return merr
	}
	st := status.Convert(err) // codes.Unknown for non-gRPC errors
	return &Error{Code: st.Code(), Message: st.Message(), status: st}
}

// CodeName spells a code the way the gRPC spec and the other clients do
// ("INVALID_ARGUMENT"), not as codes.Code.String() does ("InvalidArgument").
func CodeName(c codes.Code) string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("CODE_%d", uint32(c))
}

var codeNames = [...]string{
	"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
	"ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
	"UNAUTHENTICATED",
}
