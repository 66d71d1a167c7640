//! The JSON log line every role's `tracing` events become (design §7), so one log pipeline
//! reads them all: `ts` (RFC 3339, UTC, milliseconds), `level` (lower case), `service`
//! (`auth`, `proxy`, `exporter`, from the event's crate; `vigil` for the rest), `target`,
//! `message`, the event's own fields, and the `request_id`, `trace_id` and `span_id` of the
//! innermost span that carries them (the auth service's request span).

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The ids a span carries, kept beside it for the events inside it.
#[derive(Clone, Debug, Default)]
struct Ids {
    request_id: Option<String>,
    trace_id: Option<String>,
    span_id: Option<String>,
}

impl Ids {
    fn is_empty(&self) -> bool {
        self.request_id.is_none() && self.trace_id.is_none() && self.span_id.is_none()
    }
}

impl Visit for Ids {
    fn record_str(&mut self, field: &Field, value: &str) {
        let slot = match field.name() {
            "request_id" => &mut self.request_id,
            "trace_id" => &mut self.trace_id,
            "span_id" => &mut self.span_id,
            _ => return,
        };
        *slot = Some(value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if matches!(field.name(), "request_id" | "trace_id" | "span_id") {
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

/// Keeps each span's `request_id`, `trace_id` and `span_id` fields for [`JsonLines`].
#[derive(Debug, Default)]
pub struct IdsLayer;

impl<S> Layer<S> for IdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut ids = Ids::default();
        attrs.record(&mut ids);
        if !ids.is_empty()
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        match extensions.get_mut::<Ids>() {
            Some(ids) => values.record(ids),
            None => {
                let mut ids = Ids::default();
                values.record(&mut ids);
                if !ids.is_empty() {
                    extensions.insert(ids);
                }
            }
        }
    }
}

/// The event formatter: one JSON object per line.
#[derive(Debug, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        // A `log` record (Pingora's) names its real target in a field.
        let target = fields.log_target.as_deref().unwrap_or(meta.target());
        let mut line = Map::new();
        if let Some(scope) = ctx.event_scope() {
            let found = scope
                .from_root()
                .filter_map(|span| span.extensions().get::<Ids>().cloned())
                .last();
            if let Some(ids) = found {
                for (k, v) in [
                    ("request_id", ids.request_id),
                    ("trace_id", ids.trace_id),
                    ("span_id", ids.span_id),
                ] {
                    if let Some(v) = v {
                        line.insert(k.into(), v.into());
                    }
                }
            }
        }
        line.extend(fields.values);
        // The contract's fields first, then the rest in name order.
        let head = [
            ("ts", Value::from(timestamp())),
            ("level", meta.level().as_str().to_ascii_lowercase().into()),
            ("service", service_of(target).into()),
            ("target", target.into()),
        ];
        let mut text = String::from("{");
        for (i, (k, v)) in head
            .iter()
            .map(|(k, v)| (*k, v))
            .chain(line.iter().map(|(k, v)| (k.as_str(), v)))
            .enumerate()
        {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&serde_json::to_string(k).map_err(|_| fmt::Error)?);
            text.push(':');
            text.push_str(&serde_json::to_string(v).map_err(|_| fmt::Error)?);
        }
        text.push_str("}\n");
        writer.write_str(&text)
    }
}

/// The service a target belongs to: the role's crate, else `vigil`.
fn service_of(target: &str) -> &'static str {
    let krate = target.split("::").next().unwrap_or(target);
    match krate {
        "auth" | "vigil_auth" => "auth",
        "proxy" | "vigil_proxy" | "pingora_core" | "pingora_proxy" | "pingora_load_balancing" => {
            "proxy"
        }
        "exporter" | "vigil_exporter" => "exporter",
        _ => "vigil",
    }
}

fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An event's fields (an event's field wins over a span's id); a `log` record's metadata
/// fields (`log.target`, `log.file`, …) are taken apart from them.
#[derive(Default)]
struct Fields {
    values: Map<String, Value>,
    log_target: Option<String>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        match field.name() {
            "log.target" => self.log_target = value.as_str().map(str::to_owned),
            "log.file" | "log.line" | "log.module_path" => {}
            name => {
                self.values.insert(name.into(), value);
            }
        }
    }
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(f: impl FnOnce()) -> Vec<Value> {
        raw_lines(f)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn raw_lines(f: impl FnOnce()) -> Vec<String> {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(IdsLayer).with(
            tracing_subscriber::fmt::layer()
                .event_format(JsonLines)
                .with_writer(move || out.clone()),
        );
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn a_line_has_the_contract_s_fields_and_the_request_s_ids() {
        let out = lines(|| {
            let span = tracing::info_span!(
                target: "vigil_auth::access",
                "request",
                request_id = "r-1",
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty
            );
            span.record("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
            span.record("span_id", "00f067aa0ba902b7");
            let _entered = span.enter();
            let inner = tracing::info_span!(target: "vigil_auth::store", "db");
            let _inner = inner.enter();
            tracing::warn!(target: "vigil_auth::store", status = 503_u16, slow = true, "database unavailable");
        });
        assert_eq!(out.len(), 1);
        let l = &out[0];
        assert_eq!(l["level"], "warn");
        assert_eq!(l["service"], "auth");
        assert_eq!(l["message"], "database unavailable");
        assert_eq!(l["request_id"], "r-1");
        assert_eq!(l["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(l["span_id"], "00f067aa0ba902b7");
        assert_eq!(l["status"], 503);
        assert_eq!(l["slow"], true);
        let ts = l["ts"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(ts).is_ok() && ts.ends_with('Z'),
            "{ts}"
        );
    }

    #[test]
    fn the_contract_s_fields_come_first_and_log_records_keep_their_target() {
        let out = raw_lines(|| {
            tracing::info!(target: "vigil_exporter::server", zeta = 1, "listening");
            tracing::warn!(
                target: "log",
                { log.target = "pingora_core::services::listening", log.file = "listening.rs", log.line = 241_u64 },
                "handshake error"
            );
        });
        assert!(out[0].starts_with("{\"ts\":\""), "{}", out[0]);
        assert!(
            out[0].contains(",\"level\":\"info\",\"service\":\"exporter\",\"target\":\"vigil_exporter::server\",\"message\":\"listening\",\"zeta\":1}"),
            "{}",
            out[0]
        );
        let l: Value = serde_json::from_str(&out[1]).unwrap();
        assert_eq!(l["service"], "proxy");
        assert_eq!(l["target"], "pingora_core::services::listening");
        assert!(
            l.get("log.file").is_none() && l.get("log.target").is_none(),
            "{l}"
        );
    }

    #[test]
    fn lines_outside_a_request_name_their_service_and_no_ids() {
        let out = lines(|| {
            tracing::info!(target: "vigil_exporter::server", "listening");
            tracing::error!(target: "sqlx::query", "slow statement");
        });
        assert_eq!(out[0]["service"], "exporter");
        assert_eq!(out[0]["level"], "info");
        assert_eq!(out[1]["service"], "vigil");
        assert_eq!(out[1]["level"], "error");
        assert!(out[0].get("trace_id").is_none());
    }
}
