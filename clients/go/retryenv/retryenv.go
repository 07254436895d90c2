// Package retryenv turns on gRPC's retry support in grpc-go releases before 1.40,
// which apply a service config's retryPolicy only when GRPC_GO_RETRY=on is set
// when grpc-go initializes (Debian bookworm ships grpc-go 1.33). Later releases
// retry by default and ignore this. Import it for its side effect before any
// package that imports grpc, as the first import of package main:
//
//	import _ "masquerade/clients/go/retryenv"
//
// An explicit GRPC_GO_RETRY in the environment is left as it is.
package retryenv

import "os"

func init() {
	if _, set := os.LookupEnv("GRPC_GO_RETRY"); !set {
		os.Setenv("GRPC_GO_RETRY", "on")
	}
}
