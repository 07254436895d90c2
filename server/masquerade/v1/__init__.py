"""Generated protobuf/gRPC modules (rebuilt from proto/ by masquerade.api.codegen; never edited)."""
