//! `connector-host`: hosts echo connectors against a connector.v1 control
//! plane (or, without `--url`, a self-contained demo). See the crate docs.

fn main() -> std::process::ExitCode {
    connector_host::main(connector_host::ConnectorTypes::echo())
}
