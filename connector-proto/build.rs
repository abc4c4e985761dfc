//! Compiles `connector.proto` with a pure-Rust protobuf compiler (`protox`),
//! so building needs no `protoc` binary on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/connector/v1/connector.proto";
    println!("cargo:rerun-if-changed={proto}");
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_file(proto)?;
    // The descriptor set itself is kept too: the contract test reads it
    // (names, numbers, types as the compiler saw them) instead of parsing
    // the `.proto` a second time, and a server can serve it for reflection.
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR unset")?);
    std::fs::write(
        out.join("connector_v1_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();
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
        // Every variant is boxed: a `StreamMessage` is then 16 bytes (a
        // tag and a pointer) instead of 272, and every per-stream queue (a
        // tokio channel allocates its first block of 32 slots up front)
        // shrinks with it: 8 KiB per idle registration when the big
        // variants were boxed, another 512 bytes with the heartbeats and
        // the cancel (32 bytes, the largest left). The cost is one small
        // allocation per message; heartbeats are one per 32 answers.
        // These carry credentials (`auth_token`, `session_token`): their
        // `Debug` is written by hand in `lib.rs` and redacts them, so a
        // `{:?}` of a message in a log or a panic never prints a token.
        .skip_debug([
            ".connector.v1.RegisterRequest",
            ".connector.v1.RegisterResponse",
            ".connector.v1.ApprovalUpdate",
        ])
        .boxed(".connector.v1.StreamMessage.kind.register")
        .boxed(".connector.v1.StreamMessage.kind.register_response")
        .boxed(".connector.v1.StreamMessage.kind.execute_request")
        .boxed(".connector.v1.StreamMessage.kind.execute_response")
        .boxed(".connector.v1.StreamMessage.kind.approval_update")
        .boxed(".connector.v1.StreamMessage.kind.drain")
        .boxed(".connector.v1.StreamMessage.kind.metrics_report")
        .boxed(".connector.v1.StreamMessage.kind.heartbeat")
        .boxed(".connector.v1.StreamMessage.kind.heartbeat_ack")
        .boxed(".connector.v1.StreamMessage.kind.cancel")
        .compile_fds(fds)?;
    Ok(())
}
