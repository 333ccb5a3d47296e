//! A small serde_json QMP client: blocking, over a Unix socket.
//!
//! Why not the `qapi` crate: its typed events are generated from one QEMU schema, and
//! decoding fails as soon as a newer QEMU adds a field or event, while imgsafe needs
//! five commands (`qmp_capabilities`, `blockdev-add`, `device_add`, `cont`, `quit`) and
//! must work with whatever QEMU the host has. So replies are parsed as JSON values at
//! this edge and only the fields used are looked at.
//!
//! QMP (docs/interop/qmp-spec): the server sends a greeting `{"QMP": {...}}`; the client
//! sends `qmp_capabilities` to leave negotiation mode; then every command gets exactly
//! one `{"return": ...}` or `{"error": {"class", "desc"}}`, in order, with asynchronous
//! `{"event": ...}` messages possibly in between. Every message is one line of JSON.
//! QEMU is trusted more than the guest, but lines are still bounded in size and reads
//! in time, so a wedged QEMU cannot hang or exhaust imgsafe.

use serde_json::{json, Map, Value};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest QMP line accepted. The replies imgsafe asks for are a few KiB.
pub const MAX_LINE: usize = 1 << 20;
/// How long one command may take to be answered.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How many asynchronous events are remembered (the oldest are dropped).
pub const MAX_EVENTS: usize = 64;
/// Pause between attempts to connect while QEMU creates its socket.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket did not accept a connection in time.
    #[error("no QMP socket at {} after {:.1} s: {source}", path.display(), waited.as_secs_f64())]
    ConnectTimeout {
        path: PathBuf,
        waited: Duration,
        source: io::Error,
    },
    /// The caller stopped waiting (QEMU exited) before the socket accepted.
    #[error("gave up connecting to {}", path.display())]
    ConnectAbandoned { path: PathBuf },
    /// Reading or writing the socket failed.
    #[error("QMP {step}: {source}")]
    Io { step: String, source: io::Error },
    /// QEMU closed the connection.
    #[error("QMP {step}: QEMU closed the connection")]
    Closed { step: String },
    /// No complete message arrived in time.
    #[error("QMP {step}: no answer within {} s", timeout.as_secs())]
    Timeout { step: String, timeout: Duration },
    /// A line longer than [`MAX_LINE`].
    #[error("QMP {step}: message longer than {MAX_LINE} bytes")]
    LineTooLong { step: String },
    /// A line that is not a JSON object of the expected shape.
    #[error("QMP {step}: unexpected message: {what}")]
    Protocol { step: String, what: String },
    /// QEMU answered the command with an error.
    #[error("QMP {command} failed: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// An asynchronous event QEMU sent (SHUTDOWN, GUEST_PANICKED, STOP, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name.
    pub name: String,
    /// Its `data` member (`null` when absent).
    pub data: Value,
}

/// A connected QMP session, past capabilities negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Value,
    events: Vec<QmpEvent>,
    next_id: u64,
    timeout: Duration,
}

impl Qmp {
    /// Connect to `path`, retrying while the socket does not exist or refuses, for at most
    /// `timeout`; `keep_waiting` is asked between attempts (return false when QEMU has
    /// exited). Then read the greeting and negotiate capabilities.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        mut keep_waiting: impl FnMut() -> bool,
    ) -> Result<Qmp, QmpError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if !retryable(&e) => {
                    return Err(QmpError::Io {
                        step: format!("connect to {}", path.display()),
                        source: e,
                    })
                }
                Err(e) => {
                    if started.elapsed() >= timeout {
                        let waited = started.elapsed();
                        return Err(QmpError::ConnectTimeout {
                            path: path.to_path_buf(),
                            waited,
                            source: e,
                        });
                    }
                    if !keep_waiting() {
                        return Err(QmpError::ConnectAbandoned {
                            path: path.to_path_buf(),
                        });
                    }
                    std::thread::sleep(CONNECT_RETRY);
                }
            }
        };
        Qmp::handshake(stream, COMMAND_TIMEOUT)
    }

    /// Run the greeting and capabilities negotiation on an open stream, with `timeout`
    /// for each message.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        let io_err = |source| QmpError::Io {
            step: "setup".into(),
            source,
        };
        let writer = stream.try_clone().map_err(io_err)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            events: Vec::new(),
            next_id: 1,
            timeout,
        };
        let greeting = qmp.read_message("greeting")?;
        match greeting.get("QMP") {
            Some(Value::Object(g)) => qmp.greeting = Value::Object(g.clone()),
            _ => {
                return Err(QmpError::Protocol {
                    step: "greeting".into(),
                    what: abbreviate(&greeting),
                })
            }
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting, as (major, minor, micro).
    pub fn version(&self) -> Option<(u64, u64, u64)> {
        let v = self.greeting.get("version")?.get("qemu")?;
        Some((
            v.get("major")?.as_u64()?,
            v.get("minor")?.as_u64()?,
            v.get("micro")?.as_u64()?,
        ))
    }

    /// Run one command and return its `return` value. Events that arrive before the
    /// answer are recorded (see [`Qmp::events`]).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), json!(command));
        if let Some(args) = arguments {
            request.insert("arguments".into(), args);
        }
        request.insert("id".into(), json!(id));
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                step: command.to_string(),
                source,
            })?;
        loop {
            let message = self.read_message(command)?;
            if self.record_event(&message) {
                continue;
            }
            if message.get("id") != Some(&json!(id)) {
                return Err(QmpError::Protocol {
                    step: command.to_string(),
                    what: format!("answer for another request: {}", abbreviate(&message)),
                });
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let field = |name| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol {
                step: command.to_string(),
                what: abbreviate(&message),
            });
        }
    }

    /// Wait up to `timeout` for one more message and record it if it is an event.
    /// Returns `Ok(false)` if nothing arrived in time. For watching for `SHUTDOWN` or
    /// `GUEST_PANICKED` when no command is pending.
    pub fn wait_event(&mut self, timeout: Duration) -> Result<bool, QmpError> {
        let saved = self.timeout;
        self.timeout = timeout;
        let result = self.read_message("event");
        self.timeout = saved;
        match result {
            Ok(message) if self.record_event(&message) => Ok(true),
            Ok(message) => Err(QmpError::Protocol {
                step: "event".into(),
                what: abbreviate(&message),
            }),
            Err(QmpError::Timeout { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The events received so far (the last [`MAX_EVENTS`]).
    pub fn events(&self) -> &[QmpEvent] {
        &self.events
    }

    /// True if an event called `name` has been received.
    pub fn saw_event(&self, name: &str) -> bool {
        self.events.iter().any(|e| e.name == name)
    }

    /// Record `message` if it is an event; false if it is not one.
    fn record_event(&mut self, message: &Value) -> bool {
        let Some(name) = message.get("event").and_then(Value::as_str) else {
            return false;
        };
        if self.events.len() >= MAX_EVENTS {
            self.events.remove(0);
        }
        let data = message.get("data").cloned().unwrap_or(Value::Null);
        self.events.push(QmpEvent {
            name: name.to_string(),
            data,
        });
        true
    }

    /// Read one line (bounded in size and time) and parse it as a JSON object.
    fn read_message(&mut self, step: &str) -> Result<Value, QmpError> {
        let line = self.read_line(step)?;
        let value: Value = serde_json::from_slice(&line).map_err(|e| QmpError::Protocol {
            step: step.to_string(),
            what: format!("not JSON ({e})"),
        })?;
        if !value.is_object() {
            return Err(QmpError::Protocol {
                step: step.to_string(),
                what: abbreviate(&value),
            });
        }
        Ok(value)
    }

    /// Read up to and excluding the next `\n`, at most [`MAX_LINE`] bytes, within the
    /// timeout counted from the call.
    fn read_line(&mut self, step: &str) -> Result<Vec<u8>, QmpError> {
        let deadline = Instant::now() + self.timeout;
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    step: step.to_string(),
                    timeout: self.timeout,
                });
            }
            let io_err = |source| QmpError::Io {
                step: step.to_string(),
                source,
            };
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(io_err)?;
            let available = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Timeout {
                        step: step.to_string(),
                        timeout: self.timeout,
                    })
                }
                Err(e) => {
                    return Err(QmpError::Io {
                        step: step.to_string(),
                        source: e,
                    })
                }
            };
            if available.is_empty() {
                return Err(QmpError::Closed {
                    step: step.to_string(),
                });
            }
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (available.len(), false),
            };
            if line.len().saturating_add(take) > MAX_LINE {
                return Err(QmpError::LineTooLong {
                    step: step.to_string(),
                });
            }
            line.extend_from_slice(&available[..take]);
            self.reader.consume(if done { take + 1 } else { take });
            if done {
                return Ok(line);
            }
        }
    }
}

/// Connect errors that mean "QEMU has not created or opened the socket yet".
fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// A message shortened for an error text.
fn abbreviate(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 200 {
        let mut cut = 200;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A fake QMP server on one end of a socket pair: sends `greeting`, then for each
    /// request line received sends the next scripted answer (with `{id}` replaced by
    /// the request's id). Returns the requests it saw.
    fn fake_server(
        greeting: &'static str,
        answers: Vec<String>,
    ) -> (UnixStream, JoinHandle<Vec<Value>>) {
        let (client, server) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || {
            let mut out = server.try_clone().unwrap();
            let mut reader = BufReader::new(server);
            out.write_all(greeting.as_bytes()).unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                let request: Value = serde_json::from_str(&line).unwrap();
                let id = request["id"].to_string();
                seen.push(request);
                out.write_all(answer.replace("{id}", &id).as_bytes())
                    .unwrap();
            }
            seen
        });
        (client, handle)
    }

    const OK: &str = "{\"return\": {}, \"id\": {id}}\n";

    #[test]
    fn handshake_negotiates_capabilities() {
        let (stream, server) = fake_server(leak(format!("{GREETING}\n")), vec![OK.into()]);

        let qmp = Qmp::handshake(stream, Duration::from_secs(5)).unwrap();

        let seen = server.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(qmp.version(), Some((7, 2, 22)));
    }

    #[test]
    fn event_before_the_answer_is_recorded() {
        let answers = vec![
            OK.into(),
            "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n{\"return\": {\"status\": \"paused\"}, \"id\": {id}}\n".into(),
        ];
        let (stream, server) = fake_server(leak(format!("{GREETING}\n")), answers);
        let mut qmp = Qmp::handshake(stream, Duration::from_secs(5)).unwrap();

        let value = qmp.execute("query-status", None).unwrap();

        assert_eq!(value, json!({"status": "paused"}));
        assert!(qmp.saw_event("STOP"));
        assert_eq!(
            server.join().unwrap()[1],
            json!({"execute": "query-status", "id": 2})
        );
    }

    #[test]
    fn arguments_are_sent() {
        let (stream, server) =
            fake_server(leak(format!("{GREETING}\n")), vec![OK.into(), OK.into()]);
        let mut qmp = Qmp::handshake(stream, Duration::from_secs(5)).unwrap();

        qmp.execute("device_add", Some(json!({"driver": "virtio-blk-pci"})))
            .unwrap();

        assert_eq!(
            server.join().unwrap()[1]["arguments"],
            json!({"driver": "virtio-blk-pci"})
        );
    }

    #[test]
    fn error_reply_carries_qemu_desc() {
        let answers = vec![
            OK.into(),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Duplicate node name\"}, \"id\": {id}}\n"
                .into(),
        ];
        let (stream, _server) = fake_server(leak(format!("{GREETING}\n")), answers);
        let mut qmp = Qmp::handshake(stream, Duration::from_secs(5)).unwrap();

        let err = qmp.execute("blockdev-add", None).unwrap_err();

        assert_eq!(
            err.to_string(),
            "QMP blockdev-add failed: Duplicate node name (GenericError)"
        );
    }

    #[test]
    fn oversized_line_is_rejected() {
        let huge = format!(
            "{{\"return\": \"{}\", \"id\": {{id}}}}\n",
            "x".repeat(MAX_LINE + 10)
        );
        let (stream, _server) = fake_server(leak(format!("{GREETING}\n")), vec![OK.into(), huge]);
        let mut qmp = Qmp::handshake(stream, Duration::from_secs(5)).unwrap();

        let err = qmp.execute("query-status", None).unwrap_err();

        assert!(matches!(err, QmpError::LineTooLong { .. }), "{err}");
    }

    #[test]
    fn greeting_of_wrong_shape_is_rejected() {
        let (stream, _server) = fake_server("{\"hello\": 1}\n", vec![]);

        let err = Qmp::handshake(stream, Duration::from_secs(5))
            .err()
            .unwrap();

        assert!(matches!(err, QmpError::Protocol { .. }), "{err}");
    }

    #[test]
    fn answer_with_wrong_id_is_rejected() {
        let answers = vec![OK.into(), "{\"return\": {}, \"id\": 99}\n".into()];
        let (stream, _server) = fake_server(leak(format!("{GREETING}\n")), answers);
        let mut qmp = Qmp::handshake(stream, Duration::from_secs(5)).unwrap();

        let err = qmp.execute("cont", None).unwrap_err();

        assert!(matches!(err, QmpError::Protocol { .. }), "{err}");
    }

    #[test]
    fn silent_server_times_out() {
        let (client, mut server) = UnixStream::pair().unwrap();
        server
            .write_all(format!("{GREETING}\n").as_bytes())
            .unwrap();

        let err = Qmp::handshake(client, Duration::from_millis(100))
            .err()
            .unwrap();

        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
        let mut request = [0u8; 16];
        assert!(server.read(&mut request).unwrap() > 0);
    }

    #[test]
    fn closed_connection_is_reported() {
        let (client, server) = UnixStream::pair().unwrap();
        drop(server);

        let err = Qmp::handshake(client, Duration::from_secs(5))
            .err()
            .unwrap();

        assert!(matches!(err, QmpError::Closed { .. }), "{err}");
    }

    #[test]
    fn wait_event_records_a_shutdown() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || {
            server
                .write_all(format!("{GREETING}\n").as_bytes())
                .unwrap();
            let mut reader = BufReader::new(server.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let id = serde_json::from_str::<Value>(&line).unwrap()["id"].clone();
            server
                .write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
                .unwrap();
            server
                .write_all(
                    b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-panic\"}}\n",
                )
                .unwrap();
            server
        });
        let mut qmp = Qmp::handshake(client, Duration::from_secs(5)).unwrap();

        let got = qmp.wait_event(Duration::from_secs(5)).unwrap();

        assert!(got);
        assert_eq!(qmp.events()[0].data["reason"], "guest-panic");
        drop(handle.join().unwrap());
    }

    #[test]
    fn connect_retries_until_the_socket_exists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listen_path = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let listener = UnixListener::bind(&listen_path).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(format!("{GREETING}\n").as_bytes()).unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            conn.write_all(b"{\"return\": {}, \"id\": 1}\n").unwrap();
        });

        let qmp = Qmp::connect(&path, Duration::from_secs(5), || true);

        assert!(qmp.is_ok());
        server.join().unwrap();
    }

    #[test]
    fn connect_stops_when_told_to() {
        let dir = tempfile::tempdir().unwrap();

        let err = Qmp::connect(
            &dir.path().join("none.sock"),
            Duration::from_secs(5),
            || false,
        )
        .err()
        .unwrap();

        assert!(matches!(err, QmpError::ConnectAbandoned { .. }), "{err}");
    }

    /// The fake server wants a `'static` greeting.
    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }
}
