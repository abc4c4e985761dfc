//! `--otlp-endpoint URL`: execute spans exported over OTLP/gRPC (tonic),
//! each a child of the server's trace when the request carried a valid
//! W3C `traceparent` (connector-core's `opentelemetry` feature).
//!
//! Only with the `opentelemetry` feature; without it this module is an
//! empty shell and the flag is a one-line configuration error
//! (`cli::check_extras`).

/// The exporter's handle: flushes what is batched when the host stops.
#[derive(Debug, Default)]
pub(crate) struct Exporter {
    #[cfg(feature = "opentelemetry")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Exporter {
    /// Sends what is still batched and stops the exporter (bounded by the
    /// SDK's own export timeout). Needs the runtime the exporter was built
    /// on to be running.
    pub(crate) fn shutdown(self) {
        #[cfg(feature = "opentelemetry")]
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "OTLP exporter: could not flush the last spans");
            }
        }
    }
}

/// The layer that exports spans to `endpoint`, and its handle. Must be
/// called inside a tokio runtime (the tonic channel spawns its worker on
/// it). Exported: the SDK's `execute` spans and any span a handler makes
/// inside one, at `info` or above, whatever `--log` says; not the
/// long-lived `registration` span (an execute with no server trace is a
/// root of its own), nor the spans of the HTTP/2 stack (among them the
/// exporter's own).
#[cfg(feature = "opentelemetry")]
pub(crate) fn layer<S>(
    endpoint: &str,
) -> Result<(impl tracing_subscriber::Layer<S>, Exporter), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
    use tracing_subscriber::Layer as _;

    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    if endpoint.starts_with("https://") {
        builder = builder.with_tls_config(
            opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new().with_native_roots(),
        );
    }
    let exporter = builder
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint:?}: {e}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("connector-host")
                .build(),
        )
        .build();
    let tracer = provider.tracer("connector-host");
    let filter = tracing_subscriber::filter::filter_fn(|meta| {
        let target = meta.target();
        meta.is_span()
            && *meta.level() <= tracing::Level::INFO
            && !(meta.name() == "registration" && target.starts_with("connector_core"))
            && !["h2", "hyper", "tonic", "tower", "opentelemetry"]
                .iter()
                .any(|t| target.starts_with(t))
    });
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter);
    Ok((
        layer,
        Exporter {
            provider: Some(provider),
        },
    ))
}
