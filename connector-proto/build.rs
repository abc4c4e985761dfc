//! Compiles `connector.proto` with a pure-Rust protobuf compiler (`protox`),
//! so building needs no `protoc` binary on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/connector/v1/connector.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // The tonic stubs are generated only with the `grpc` feature so that
    // `connector-core` can use the messages without tonic in its tree.
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        // The RPC is called `Connect`; the generated `connect(dst)` constructor
        // would clash with it, and the SDK builds its own channels anyway.
        .build_transport(false)
        // Payloads as `Bytes`: decoding slices tonic's receive buffer instead
        // of copying, and the response a registration keeps for redelivery
        // shares its payload with the one on the wire.
        .bytes(".")
        // `register` is by far the largest variant (272 of `StreamMessage`'s
        // 272 bytes) and is sent once per stream: boxed, every message in a
        // queue (a channel block holds 32) takes 136 bytes instead.
        .boxed(".connector.v1.StreamMessage.kind.register")
        .boxed(".connector.v1.StreamMessage.kind.register_response")
        .boxed(".connector.v1.StreamMessage.kind.execute_request")
        .boxed(".connector.v1.StreamMessage.kind.execute_response")
        .compile_fds(fds)?;
    Ok(())
}
