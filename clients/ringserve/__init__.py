"""ringserve client SDK (needs only grpcio and protobuf)."""
