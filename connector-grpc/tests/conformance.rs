//! The transport-independent conformance suite
//! (`connector_testkit::conformance`) over `GrpcTransport`. What is
//! specific to gRPC (HTTP/2 stream accounting, server stream limits) is in
//! the other files here.

connector_testkit::conformance_suite!(connector_testkit::conformance::Target::grpc());
