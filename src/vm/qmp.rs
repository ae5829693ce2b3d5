//! The little of QEMU's QMP that mkt speaks (for `mkt stop`): read the
//! greeting, leave negotiation mode with `qmp_capabilities`, run one
//! command, read its reply. Each message is one JSON object a line;
//! events may come between, and are skipped.

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The commands mkt sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Command {
    QmpCapabilities,
    /// An ACPI power button press: the guest shuts down cleanly.
    SystemPowerdown,
    /// QEMU exits at once.
    Quit,
}

#[derive(Serialize)]
struct Execute {
    execute: Command,
}

/// `{"QMP": {"version": {...}, "capabilities": [...]}}`: nothing in it
/// matters to mkt but that it is QMP.
#[derive(Debug, Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    _qmp: serde_json::Value,
}

/// What QEMU sends after the greeting: a command's reply or an event.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Message {
    /// `{"return": {}}`: the command succeeded (mkt's commands return nothing).
    Return {
        #[serde(rename = "return")]
        _value: serde_json::Value,
    },
    /// `{"error": {"class": "GenericError", "desc": "..."}}`.
    Error { error: Refusal },
    /// `{"event": "SHUTDOWN", "timestamp": {...}, "data": {...}}`.
    Event { event: String },
}

#[derive(Debug, Deserialize)]
struct Refusal {
    class: String,
    desc: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    #[error("cannot talk to QMP at {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP at {path} closed before answering {command:?}")]
    Closed {
        path: std::path::PathBuf,
        command: Command,
    },
    #[error("QMP at {path} sent {line:?}")]
    Unexpected {
        path: std::path::PathBuf,
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QEMU refused {command:?}: {class}: {desc}")]
    Refused {
        command: Command,
        class: String,
        desc: String,
    },
}

/// Sends one QMP command to the QEMU listening on `socket` (after the
/// greeting and the capabilities handshake) and waits for its reply, at
/// most 5 s for each message.
pub(crate) fn execute(socket: &Path, command: Command) -> Result<(), QmpError> {
    let io = |source| QmpError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut write = UnixStream::connect(socket).map_err(io)?;
    write
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut lines = BufReader::new(write.try_clone().map_err(io)?).lines();
    // The next message, read before the reply to `command`.
    let mut next = |command| match lines.next() {
        None => Err(QmpError::Closed {
            path: socket.to_path_buf(),
            command,
        }),
        Some(l) => l.map_err(io),
    };
    let _: Greeting = parse(socket, next(Command::QmpCapabilities)?)?;
    for c in [Command::QmpCapabilities, command] {
        let text = serde_json::to_string(&Execute { execute: c }).map_err(io::Error::other);
        writeln!(write, "{}", text.map_err(io)?).map_err(io)?;
        loop {
            match parse(socket, next(c)?)? {
                Message::Return { .. } => break,
                Message::Error { error } => {
                    return Err(QmpError::Refused {
                        command: c,
                        class: error.class,
                        desc: error.desc,
                    });
                }
                Message::Event { event } => tracing::debug!("QMP event {event}"),
            }
        }
    }
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(socket: &Path, line: String) -> Result<T, QmpError> {
    serde_json::from_str(&line).map_err(|source| QmpError::Unexpected {
        path: socket.to_path_buf(),
        line,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Stdio};

    /// A QEMU with no machine at all, its QMP on `socket`, up once the
    /// socket answers.
    fn qemu(socket: &Path) -> Child {
        let spec = format!("unix:{},server=on,wait=off", socket.display());
        let child = std::process::Command::new(crate::arch::HOST.qemu)
            .args(["-machine", "none", "-nodefaults", "-display", "none"])
            .args(["-qmp", &spec])
            .stdin(Stdio::null())
            .spawn()
            .expect("QEMU runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(socket).is_err() {
            assert!(std::time::Instant::now() < deadline, "no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    #[test]
    fn quit_through_qmp_ends_qemu() {
        let d = tempfile::tempdir().unwrap();
        let socket = d.path().join("qmp");
        let mut child = qemu(&socket);
        // The first connection above took the greeting and left: a new one
        // starts over.
        execute(&socket, Command::SystemPowerdown).unwrap();
        execute(&socket, Command::Quit).unwrap();
        assert!(child.wait().unwrap().success());
        let e = execute(&socket, Command::Quit).unwrap_err();
        assert!(matches!(e, QmpError::Io { .. }), "{e:?}");
    }

    #[test]
    fn a_refused_command_is_an_error_with_qemus_words() {
        let d = tempfile::tempdir().unwrap();
        let socket = d.path().join("qmp");
        let mut child = qemu(&socket);
        // The handshake is over: QEMU refuses a second one.
        let e = execute(&socket, Command::QmpCapabilities).unwrap_err();
        match &e {
            QmpError::Refused { class, desc, .. } => {
                assert_eq!(class, "CommandNotFound", "{e}");
                assert!(desc.contains("already complete"), "{e}");
            }
            e => panic!("{e:?}"),
        }
        execute(&socket, Command::Quit).unwrap();
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn replies_and_events_decode_and_other_lines_are_errors() {
        let m = |l: &str| serde_json::from_str::<Message>(l);
        assert!(matches!(m(r#"{"return": {}}"#), Ok(Message::Return { .. })));
        assert!(matches!(
            m(r#"{"event": "POWERDOWN", "timestamp": {"seconds": 1, "microseconds": 2}}"#),
            Ok(Message::Event { event }) if event == "POWERDOWN"
        ));
        assert!(matches!(
            m(r#"{"error": {"class": "GenericError", "desc": "no"}}"#),
            Ok(Message::Error { error }) if error.class == "GenericError" && error.desc == "no"
        ));
        assert!(m(r#"{"QMP": {}}"#).is_err());
        assert!(m("not json").is_err());
        let cmd = serde_json::to_string(&Execute {
            execute: Command::SystemPowerdown,
        });
        assert_eq!(cmd.unwrap(), r#"{"execute":"system_powerdown"}"#);
    }
}
