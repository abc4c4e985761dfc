//! `cargo xtask proto-check [PATH]`: the `.proto` file must carry the wire
//! contract exactly: every message, field (type, name, number), enum value
//! and the service, as tabled below from the wire contract document.
//!
//! The parser is deliberately small and tolerant: it strips comments, reads
//! `message`/`enum`/`oneof`/`service` blocks and `type name = N;` lines, and
//! skips options, imports and `reserved` statements.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the wire contract lives, relative to the workspace root.
pub(crate) const PROTO_PATH: &str = "connector-proto/proto/connector/v1/connector.proto";

const PACKAGE: &str = "connector.v1";

/// The one service and its one method, as `name(request) returns (response)`.
const SERVICE: (&str, &str, &str) = (
    "ConnectorService",
    "Connect",
    "(stream StreamMessage) returns (stream StreamMessage)",
);

/// A field of the contract: (type, name, number). Fields of a `oneof` have
/// the type `oneof NAME TYPE`.
type FieldSpec = (&'static str, &'static str, i64);

/// Messages of the wire contract, with their fields.
const MESSAGES: &[(&str, &[FieldSpec])] = &[
    (
        "StreamMessage",
        &[
            ("oneof kind RegisterRequest", "register", 1),
            ("oneof kind RegisterResponse", "register_response", 2),
            ("oneof kind ApprovalUpdate", "approval_update", 3),
            ("oneof kind Heartbeat", "heartbeat", 4),
            ("oneof kind HeartbeatAck", "heartbeat_ack", 5),
            ("oneof kind ExecuteRequest", "execute_request", 6),
            ("oneof kind ExecuteResponse", "execute_response", 7),
            ("oneof kind CancelRequest", "cancel", 8),
            ("oneof kind Drain", "drain", 9),
            ("oneof kind MetricsReport", "metrics_report", 10),
        ],
    ),
    (
        "RegisterRequest",
        &[
            ("string", "tenant_id", 1),
            ("string", "connector_type", 2),
            ("string", "instance_id", 3),
            ("string", "version", 4),
            ("string", "auth_token", 5),
            ("string", "session_token", 6),
            ("string", "display_name", 7),
            ("repeated string", "tags", 8),
            ("map<string,string>", "metadata", 9),
            ("ConnectorBehavior", "behavior", 10),
            ("uint32", "max_concurrent_requests", 11),
            ("repeated Capability", "capabilities", 12),
        ],
    ),
    (
        "Capability",
        &[
            ("string", "id", 1),
            ("string", "description", 2),
            ("string", "input_schema_json", 3),
            ("string", "output_schema_json", 4),
        ],
    ),
    (
        "RegisterResponse",
        &[
            ("RegistrationStatus", "status", 1),
            ("string", "session_token", 2),
            ("string", "address", 3),
            ("string", "message", 4),
            ("RejectReason", "reject_reason", 5),
            ("uint32", "heartbeat_interval_ms", 6),
        ],
    ),
    (
        "ApprovalUpdate",
        &[
            ("RegistrationStatus", "status", 1),
            ("string", "session_token", 2),
            ("string", "message", 3),
            ("RejectReason", "reject_reason", 4),
        ],
    ),
    (
        "Heartbeat",
        &[("uint64", "sequence", 1), ("int64", "sent_at_unix_ms", 2)],
    ),
    (
        "HeartbeatAck",
        &[
            ("uint64", "sequence", 1),
            ("int64", "sent_at_unix_ms", 2),
            ("bool", "should_reconnect", 3),
        ],
    ),
    (
        "ExecuteRequest",
        &[
            ("string", "request_id", 1),
            ("bytes", "payload", 2),
            ("PayloadEncoding", "encoding", 3),
            ("map<string,string>", "context", 4),
            ("string", "capability_id", 5),
            ("uint32", "timeout_ms", 6),
        ],
    ),
    (
        "ExecuteResponse",
        &[
            ("string", "request_id", 1),
            ("bool", "success", 2),
            ("bytes", "payload", 3),
            ("PayloadEncoding", "encoding", 4),
            ("string", "error", 5),
            ("uint64", "duration_ms", 6),
            ("ExecuteErrorKind", "error_kind", 7),
        ],
    ),
    ("CancelRequest", &[("string", "request_id", 1)]),
    (
        "Drain",
        &[("string", "reason", 1), ("uint32", "reconnect_after_ms", 2)],
    ),
    (
        "MetricsReport",
        &[
            ("uint64", "requests_received", 1),
            ("uint64", "requests_succeeded", 2),
            ("uint64", "requests_failed", 3),
            ("uint32", "in_flight", 4),
            ("uint64", "total_disconnects", 5),
            ("uint64", "successful_reconnects", 6),
            ("uint32", "last_heartbeat_rtt_ms", 7),
        ],
    ),
];

/// Enums of the wire contract: (enum, [(value, number)]).
const ENUMS: &[(&str, &[(&str, i64)])] = &[
    (
        "RegistrationStatus",
        &[
            ("REGISTRATION_STATUS_UNSPECIFIED", 0),
            ("REGISTRATION_STATUS_PENDING", 1),
            ("REGISTRATION_STATUS_APPROVED", 2),
            ("REGISTRATION_STATUS_REJECTED", 3),
        ],
    ),
    (
        "RejectReason",
        &[
            ("REJECT_REASON_UNSPECIFIED", 0),
            ("REJECT_REASON_DENIED", 1),
            ("REJECT_REASON_INVALID_CREDENTIALS", 2),
            ("REJECT_REASON_SESSION_EXPIRED", 3),
            ("REJECT_REASON_DUPLICATE", 4),
            ("REJECT_REASON_INVALID_REQUEST", 5),
        ],
    ),
    (
        "PayloadEncoding",
        &[
            ("PAYLOAD_ENCODING_UNSPECIFIED", 0),
            ("PAYLOAD_ENCODING_JSON", 1),
            ("PAYLOAD_ENCODING_RAW", 2),
        ],
    ),
    (
        "ConnectorBehavior",
        &[
            ("CONNECTOR_BEHAVIOR_UNSPECIFIED", 0),
            ("CONNECTOR_BEHAVIOR_TOOL", 1),
            ("CONNECTOR_BEHAVIOR_REQUEST_RESPONSE", 2),
            ("CONNECTOR_BEHAVIOR_SOURCE", 3),
            ("CONNECTOR_BEHAVIOR_SINK", 4),
        ],
    ),
    (
        "ExecuteErrorKind",
        &[
            ("EXECUTE_ERROR_KIND_UNSPECIFIED", 0),
            ("EXECUTE_ERROR_KIND_HANDLER", 1),
            ("EXECUTE_ERROR_KIND_TIMEOUT", 2),
            ("EXECUTE_ERROR_KIND_CANCELLED", 3),
            ("EXECUTE_ERROR_KIND_BAD_PAYLOAD", 4),
            ("EXECUTE_ERROR_KIND_OVERLOADED", 5),
            ("EXECUTE_ERROR_KIND_UNKNOWN_CAPABILITY", 6),
        ],
    ),
];

pub(crate) fn default_path() -> PathBuf {
    crate::cmd::workspace_root().join(PROTO_PATH)
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    match args {
        [] => check_file(&default_path()),
        [path] => check_file(Path::new(path)),
        _ => Err("usage: cargo xtask proto-check [PATH]".to_string()),
    }
}

pub(crate) fn check_file(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let proto = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let problems = compare(&proto);
    if problems.is_empty() {
        let fields: usize = MESSAGES.iter().map(|(_, f)| f.len()).sum();
        let values: usize = ENUMS.iter().map(|(_, v)| v.len()).sum();
        println!(
            "{}: matches the wire contract ({} messages, {fields} fields, {} enums, {values} values, 1 rpc)",
            path.display(),
            MESSAGES.len(),
            ENUMS.len()
        );
        Ok(())
    } else {
        Err(format!(
            "{} does not match the wire contract ({} differences; `-` is the contract, `+` the file):\n{}",
            path.display(),
            problems.len(),
            problems.join("\n")
        ))
    }
}

// ---------------------------------------------------------------- parsing

/// What the checker reads from a `.proto` file.
#[derive(Debug, Default)]
struct Proto {
    syntax: Option<String>,
    package: Option<String>,
    /// Message (nested ones as `Outer.Inner`) to its fields in file order.
    messages: BTreeMap<String, Vec<Field>>,
    /// Enum (nested ones as `Outer.Inner`) to its values in file order.
    enums: BTreeMap<String, Vec<(String, i64, usize)>>,
    /// Service to its rpcs: (name, signature, line).
    services: BTreeMap<String, Vec<(String, String, usize)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    ty: String,
    name: String,
    number: i64,
    line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    line: usize,
}

/// Splits `.proto` text into words, numbers, string literals and single
/// punctuation characters, dropping `//` and `/* */` comments.
fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let start = line;
            i += 2;
            loop {
                match (chars.get(i), chars.get(i + 1)) {
                    (Some('*'), Some('/')) => {
                        i += 2;
                        break;
                    }
                    (Some(c), _) => {
                        if *c == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                    (None, _) => return Err(format!("line {start}: unterminated /* comment")),
                }
            }
        } else if c == '"' || c == '\'' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                if chars.get(i) == Some(&'\n') {
                    return Err(format!("line {line}: unterminated string"));
                }
                i += 1;
            }
            i += 1;
            let end = i.min(chars.len());
            tokens.push(Token {
                text: chars[start..end].iter().collect(),
                line,
            });
        } else if c.is_alphanumeric() || c == '_' || c == '.' || c == '-' || c == '+' {
            let start = i;
            i += 1;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            tokens.push(Token {
                text: chars[start..i].iter().collect(),
                line,
            });
        } else {
            tokens.push(Token {
                text: c.to_string(),
                line,
            });
            i += 1;
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    proto: Proto,
}

fn parse(text: &str) -> Result<Proto, String> {
    let mut parser = Parser {
        tokens: tokenize(text)?,
        pos: 0,
        proto: Proto::default(),
    };
    parser.file()?;
    Ok(parser.proto)
}

impl Parser {
    fn peek(&self) -> Option<&str> {
        self.tokens.get(self.pos).map(|t| t.text.as_str())
    }

    fn line(&self) -> usize {
        self.tokens
            .get(self.pos)
            .or(self.tokens.last())
            .map_or(0, |t| t.line)
    }

    fn next(&mut self) -> Result<Token, String> {
        let token = self
            .tokens
            .get(self.pos)
            .cloned()
            .ok_or_else(|| "unexpected end of file".to_string())?;
        self.pos += 1;
        Ok(token)
    }

    fn expect(&mut self, text: &str) -> Result<(), String> {
        let token = self.next()?;
        if token.text == text {
            Ok(())
        } else {
            Err(format!(
                "line {}: expected `{text}`, found `{}`",
                token.line, token.text
            ))
        }
    }

    /// Skips to just past the next `;` at this nesting level, or past a
    /// balanced `{ ... }` block if one comes first.
    fn skip_statement(&mut self) -> Result<(), String> {
        let mut depth = 0usize;
        loop {
            let token = self.next()?;
            match token.text.as_str() {
                ";" if depth == 0 => return Ok(()),
                "{" => depth += 1,
                "}" if depth == 0 => {
                    return Err(format!("line {}: unexpected `}}`", token.line));
                }
                "}" => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
    }

    fn file(&mut self) -> Result<(), String> {
        while let Some(word) = self.peek() {
            match word {
                "syntax" => {
                    self.pos += 1;
                    self.expect("=")?;
                    let value = self.next()?.text;
                    self.proto.syntax = Some(value.trim_matches(['"', '\'']).to_string());
                    self.expect(";")?;
                }
                "package" => {
                    self.pos += 1;
                    self.proto.package = Some(self.next()?.text);
                    self.expect(";")?;
                }
                "message" => {
                    self.pos += 1;
                    self.message("")?;
                }
                "enum" => {
                    self.pos += 1;
                    self.enumeration("")?;
                }
                "service" => {
                    self.pos += 1;
                    self.service()?;
                }
                ";" => self.pos += 1,
                _ => self.skip_statement()?, // import, option, edition, extend, ...
            }
        }
        Ok(())
    }

    fn message(&mut self, scope: &str) -> Result<(), String> {
        let name = qualify(scope, &self.next()?.text);
        self.expect("{")?;
        self.proto.messages.entry(name.clone()).or_default();
        self.message_body(&name, None)
    }

    /// Reads statements up to and including the closing `}` of a message or
    /// of a `oneof` inside it.
    fn message_body(&mut self, message: &str, oneof: Option<&str>) -> Result<(), String> {
        loop {
            let Some(word) = self.peek() else {
                return Err(format!("message {message}: missing closing `}}`"));
            };
            match word {
                "}" => {
                    self.pos += 1;
                    return Ok(());
                }
                ";" => self.pos += 1,
                "message" => {
                    self.pos += 1;
                    self.message(message)?;
                }
                "enum" => {
                    self.pos += 1;
                    self.enumeration(message)?;
                }
                "oneof" => {
                    self.pos += 1;
                    let name = self.next()?.text;
                    self.expect("{")?;
                    self.message_body(message, Some(&name))?;
                }
                "option" | "reserved" | "extensions" | "extend" => self.skip_statement()?,
                _ => {
                    let field = self.field(oneof)?;
                    self.proto
                        .messages
                        .entry(message.to_string())
                        .or_default()
                        .push(field);
                }
            }
        }
    }

    /// `[label] type name = N [options];` with `map<K, V>` types.
    fn field(&mut self, oneof: Option<&str>) -> Result<Field, String> {
        let line = self.line();
        let mut before_eq = Vec::new();
        loop {
            let token = self.next()?;
            match token.text.as_str() {
                "=" => break,
                ";" | "{" | "}" => {
                    return Err(format!(
                        "line {}: expected a field `type name = N;`, found `{}`",
                        token.line, token.text
                    ));
                }
                _ => before_eq.push(token.text),
            }
        }
        let number_token = self.next()?;
        let number = parse_number(&number_token.text).ok_or_else(|| {
            format!(
                "line {}: field number `{}` is not a number",
                number_token.line, number_token.text
            )
        })?;
        self.skip_statement()?; // `[options] ;`
        let Some(name) = before_eq.pop() else {
            return Err(format!("line {line}: field without a name"));
        };
        let mut ty = String::new();
        if let Some(oneof) = oneof {
            ty.push_str(&format!("oneof {oneof} "));
        }
        let mut previous_word = false;
        for part in &before_eq {
            let is_word = part.starts_with(|c: char| c.is_alphanumeric() || c == '_' || c == '.');
            if is_word && previous_word {
                ty.push(' ');
            }
            ty.push_str(&normalize_type(part));
            previous_word = is_word;
        }
        if ty.is_empty() {
            return Err(format!("line {line}: field `{name}` has no type"));
        }
        Ok(Field {
            ty,
            name,
            number,
            line,
        })
    }

    fn enumeration(&mut self, scope: &str) -> Result<(), String> {
        let name = qualify(scope, &self.next()?.text);
        self.expect("{")?;
        let mut values = Vec::new();
        loop {
            let Some(word) = self.peek() else {
                return Err(format!("enum {name}: missing closing `}}`"));
            };
            match word {
                "}" => {
                    self.pos += 1;
                    break;
                }
                ";" => self.pos += 1,
                "option" | "reserved" => self.skip_statement()?,
                _ => {
                    let value = self.next()?;
                    self.expect("=")?;
                    let number_token = self.next()?;
                    let number = parse_number(&number_token.text).ok_or_else(|| {
                        format!(
                            "line {}: enum value `{}` is not a number",
                            number_token.line, number_token.text
                        )
                    })?;
                    self.skip_statement()?;
                    values.push((value.text, number, value.line));
                }
            }
        }
        self.proto.enums.entry(name).or_default().extend(values);
        Ok(())
    }

    fn service(&mut self) -> Result<(), String> {
        let name = self.next()?.text;
        self.expect("{")?;
        let mut rpcs = Vec::new();
        loop {
            let Some(word) = self.peek() else {
                return Err(format!("service {name}: missing closing `}}`"));
            };
            match word {
                "}" => {
                    self.pos += 1;
                    break;
                }
                ";" => self.pos += 1,
                "rpc" => {
                    let line = self.line();
                    self.pos += 1;
                    let rpc = self.next()?.text;
                    // `(stream A) returns (stream B)` up to `;` or `{`.
                    let mut words = Vec::new();
                    while let Some(word) = self.peek() {
                        if word == ";" || word == "{" {
                            break;
                        }
                        words.push(normalize_type(word));
                        self.pos += 1;
                    }
                    let signature = words.join(" ").replace("( ", "(").replace(" )", ")");
                    self.skip_statement()?;
                    rpcs.push((rpc, signature, line));
                }
                _ => self.skip_statement()?,
            }
        }
        self.proto.services.entry(name).or_default().extend(rpcs);
        Ok(())
    }
}

fn qualify(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_string()
    } else {
        format!("{scope}.{name}")
    }
}

/// `.connector.v1.Foo` and `connector.v1.Foo` are `Foo`.
fn normalize_type(ty: &str) -> String {
    let ty = ty.strip_prefix('.').unwrap_or(ty);
    ty.strip_prefix("connector.v1.").unwrap_or(ty).to_string()
}

fn parse_number(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let value = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        i64::from_str_radix(hex, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        i64::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse().ok()?
    };
    Some(if negative { -value } else { value })
}

// ------------------------------------------------------------- comparing

/// Every difference between the file and the contract, as diff-like lines.
fn compare(proto: &Proto) -> Vec<String> {
    let mut problems = Vec::new();
    if proto.syntax.as_deref() != Some("proto3") {
        problems.push(format!(
            "syntax:\n  - syntax = \"proto3\";\n  + {}",
            proto
                .syntax
                .as_ref()
                .map_or("(none)".to_string(), |s| format!("syntax = \"{s}\";"))
        ));
    }
    if proto.package.as_deref() != Some(PACKAGE) {
        problems.push(format!(
            "package:\n  - package {PACKAGE};\n  + {}",
            proto
                .package
                .as_ref()
                .map_or("(none)".to_string(), |p| format!("package {p};"))
        ));
    }

    for &(message, expected) in MESSAGES {
        let Some(fields) = proto.messages.get(message) else {
            let lines: Vec<String> = expected
                .iter()
                .map(|(ty, name, number)| format!("  -   {ty} {name} = {number};"))
                .collect();
            problems.push(format!(
                "message {message}: missing\n  - message {message} {{\n{}\n  - }}",
                lines.join("\n")
            ));
            continue;
        };
        for &(ty, name, number) in expected {
            let want = format!("{ty} {name} = {number};");
            match fields.iter().find(|f| f.name == name) {
                None => problems.push(format!(
                    "message {message}: field `{name}` missing\n  - {want}\n  + (none)"
                )),
                Some(f) if f.number != number || f.ty != ty => problems.push(format!(
                    "message {message}: field `{name}` differs (line {})\n  - {want}\n  + {} {} = {};",
                    f.line, f.ty, f.name, f.number
                )),
                Some(_) => {}
            }
        }
        for f in fields {
            if !expected.iter().any(|&(_, name, _)| name == f.name) {
                problems.push(format!(
                    "message {message}: field `{}` is not in the contract (line {})\n  - (none)\n  + {} {} = {};",
                    f.name, f.line, f.ty, f.name, f.number
                ));
            }
        }
        for (i, f) in fields.iter().enumerate() {
            if let Some(g) = fields[..i].iter().find(|g| g.number == f.number) {
                problems.push(format!(
                    "message {message}: number {} used twice, by `{}` (line {}) and `{}` (line {})",
                    f.number, g.name, g.line, f.name, f.line
                ));
            }
        }
    }

    for &(name, expected) in ENUMS {
        let Some(values) = proto.enums.get(name) else {
            let lines: Vec<String> = expected
                .iter()
                .map(|(value, number)| format!("  -   {value} = {number};"))
                .collect();
            problems.push(format!(
                "enum {name}: missing\n  - enum {name} {{\n{}\n  - }}",
                lines.join("\n")
            ));
            continue;
        };
        for &(value, number) in expected {
            match values.iter().find(|(v, _, _)| v == value) {
                None => problems.push(format!(
                    "enum {name}: value `{value}` missing\n  - {value} = {number};\n  + (none)"
                )),
                Some((_, n, line)) if *n != number => problems.push(format!(
                    "enum {name}: value `{value}` differs (line {line})\n  - {value} = {number};\n  + {value} = {n};"
                )),
                Some(_) => {}
            }
        }
        for (value, number, line) in values {
            if !expected.iter().any(|&(v, _)| v == value) {
                problems.push(format!(
                    "enum {name}: value `{value}` is not in the contract (line {line})\n  - (none)\n  + {value} = {number};"
                ));
            }
        }
    }

    let (service, rpc, signature) = SERVICE;
    let want = format!("rpc {rpc}{signature};");
    match proto.services.get(service) {
        None => problems.push(format!(
            "service {service}: missing\n  - service {service} {{ {want} }}\n  + (none)"
        )),
        Some(rpcs) => {
            match rpcs.iter().find(|(name, _, _)| name == rpc) {
                None => problems.push(format!(
                    "service {service}: rpc `{rpc}` missing\n  - {want}\n  + (none)"
                )),
                Some((_, sig, line)) if sig != signature => problems.push(format!(
                    "service {service}: rpc `{rpc}` differs (line {line})\n  - {want}\n  + rpc {rpc}{sig};"
                )),
                Some(_) => {}
            }
            for (name, sig, line) in rpcs {
                if name != rpc {
                    problems.push(format!(
                        "service {service}: rpc `{name}` is not in the contract (line {line})\n  - (none)\n  + rpc {name}{sig};"
                    ));
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_proto() -> String {
        std::fs::read_to_string(default_path()).expect("the real .proto file is readable")
    }

    fn problems_of(text: &str) -> Vec<String> {
        compare(&parse(text).expect("parses"))
    }

    #[test]
    fn the_real_proto_matches_the_contract() {
        assert_eq!(problems_of(&real_proto()), Vec::<String>::new());
    }

    #[test]
    fn a_renumbered_field_is_reported_with_both_sides() {
        let text = real_proto().replace("uint64 sequence = 1;", "uint64 sequence = 9;");
        let problems = problems_of(&text);
        assert_eq!(problems.len(), 2, "{problems:#?}"); // Heartbeat and HeartbeatAck
        assert!(problems[0].contains("message Heartbeat: field `sequence` differs"));
        assert!(problems[0].contains("- uint64 sequence = 1;"));
        assert!(problems[0].contains("+ uint64 sequence = 9;"));
    }

    #[test]
    fn type_enum_value_and_extra_field_changes_are_reported() {
        let text = real_proto()
            .replace("string tenant_id = 1;", "bytes tenant_id = 1;")
            .replace(
                "REJECT_REASON_DUPLICATE = 4;",
                "REJECT_REASON_DUPLICATE = 7;",
            )
            .replace(
                "string reason = 1;",
                "string reason = 1;\n  string extra = 3;",
            )
            .replace("MetricsReport metrics_report = 10;", "");
        let problems = problems_of(&text).join("\n");
        assert!(problems.contains("+ bytes tenant_id = 1;"), "{problems}");
        assert!(
            problems.contains("+ REJECT_REASON_DUPLICATE = 7;"),
            "{problems}"
        );
        assert!(
            problems.contains("field `extra` is not in the contract"),
            "{problems}"
        );
        assert!(
            problems.contains("field `metrics_report` missing"),
            "{problems}"
        );
    }

    #[test]
    fn parser_is_tolerant_of_layout_comments_options_and_qualified_types() {
        let text = r#"
            /* header
               comment */ syntax = 'proto3'; package connector.v1;
            import "google/protobuf/empty.proto";
            option java_package = "x.y";
            message A { reserved 5, 6; reserved "old";
              oneof kind { .connector.v1.B b = 1 [deprecated = true]; }
              map < string , string > m = 0x2; // trailing
              repeated connector.v1.B bs = 3;
              message Inner { int32 x = 1; }
              enum E { option allow_alias = true; E_UNSPECIFIED = 0; E_NEG = -1; }
            }
            service S { rpc Call ( stream A ) returns ( B ) { option deprecated = true; } }
        "#;
        let proto = parse(text).expect("parses");
        assert_eq!(proto.syntax.as_deref(), Some("proto3"));
        assert_eq!(proto.package.as_deref(), Some("connector.v1"));
        let fields: Vec<(String, String, i64)> = proto.messages["A"]
            .iter()
            .map(|f| (f.ty.clone(), f.name.clone(), f.number))
            .collect();
        assert_eq!(
            fields,
            [
                ("oneof kind B".to_string(), "b".to_string(), 1),
                ("map<string,string>".to_string(), "m".to_string(), 2),
                ("repeated B".to_string(), "bs".to_string(), 3),
            ]
        );
        assert_eq!(proto.messages["A.Inner"][0].name, "x");
        let values: Vec<(&str, i64)> = proto.enums["A.E"]
            .iter()
            .map(|(v, n, _)| (v.as_str(), *n))
            .collect();
        assert_eq!(values, [("E_UNSPECIFIED", 0), ("E_NEG", -1)]);
        assert_eq!(proto.services["S"][0].1, "(stream A) returns (B)");
    }

    #[test]
    fn a_broken_file_is_an_error_not_a_panic() {
        assert!(parse("message A { string x = ; }").is_err());
        assert!(parse("message A { string x = 1;").is_err());
        assert!(parse("/* never closed").is_err());
    }
}
