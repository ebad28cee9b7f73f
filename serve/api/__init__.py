"""The API layers over a Backend: grpc_server.py (lmforge.v1 over gRPC); _gen/ holds generated code."""
