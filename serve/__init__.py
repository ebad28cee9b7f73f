"""lmforge serving: the native engine, backends, gRPC/HTTP API, metrics and evaluation client."""
