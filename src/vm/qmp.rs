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

/// `{"QMP": {"version": {"qemu": {"major": 8, ...}, ...}, "capabilities": [...]}}`.
#[derive(Debug, Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Debug, Deserialize)]
struct GreetingBody {
    version: Version,
}

#[derive(Debug, Deserialize)]
struct Version {
    qemu: Triple,
}

#[derive(Debug, Deserialize)]
struct Triple {
    major: u32,
    minor: u32,
    micro: u32,
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

/// One QMP conversation on a socket.
struct Session<'a> {
    path: &'a Path,
    read: BufReader<UnixStream>,
    write: UnixStream,
}

impl Session<'_> {
    fn io(&self, source: io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.to_path_buf(),
            source,
        }
    }

    /// The next line, None at the end of the stream.
    fn line(&mut self) -> Result<Option<String>, QmpError> {
        let mut line = String::new();
        match self.read.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line)),
            Err(e) => Err(self.io(e)),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, line: &str) -> Result<T, QmpError> {
        serde_json::from_str(line).map_err(|source| QmpError::Unexpected {
            path: self.path.to_path_buf(),
            line: line.trim().to_string(),
            source,
        })
    }

    /// Sends `command` and reads up to its reply.
    fn execute(&mut self, command: Command) -> Result<(), QmpError> {
        let mut text = serde_json::to_string(&Execute { execute: command })
            .expect("a unit variant serializes");
        text.push('\n');
        self.write
            .write_all(text.as_bytes())
            .map_err(|e| self.io(e))?;
        loop {
            let Some(line) = self.line()? else {
                return Err(QmpError::Closed {
                    path: self.path.to_path_buf(),
                    command,
                });
            };
            match self.parse::<Message>(&line)? {
                Message::Return { .. } => return Ok(()),
                Message::Error { error } => {
                    return Err(QmpError::Refused {
                        command,
                        class: error.class,
                        desc: error.desc,
                    });
                }
                Message::Event { event } => tracing::debug!("QMP event {event}"),
            }
        }
    }
}

/// Sends one QMP command to the QEMU listening on `socket` (after the
/// greeting and the capabilities handshake) and waits for its reply, at
/// most 5 s for each message.
pub(crate) fn execute(socket: &Path, command: Command) -> Result<(), QmpError> {
    let io = |source| QmpError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let write = UnixStream::connect(socket).map_err(io)?;
    write
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let read = BufReader::new(write.try_clone().map_err(io)?);
    let mut s = Session {
        path: socket,
        read,
        write,
    };
    let Some(line) = s.line()? else {
        return Err(QmpError::Closed {
            path: socket.to_path_buf(),
            command: Command::QmpCapabilities,
        });
    };
    let Greeting { qmp } = s.parse(&line)?;
    let v = qmp.version.qemu;
    tracing::debug!("QMP of QEMU {}.{}.{}", v.major, v.minor, v.micro);
    s.execute(Command::QmpCapabilities)?;
    s.execute(command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Stdio};

    /// A QEMU with no machine at all, its QMP on `socket`, up once the
    /// socket answers.
    fn qemu(socket: &Path) -> Child {
        let spec = format!("unix:{},server=on,wait=off", socket.display());
        let child = std::process::Command::new("qemu-system-x86_64")
            .args(["-machine", "none", "-nodefaults", "-display", "none"])
            .args(["-qmp", &spec])
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 runs");
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
        let write = UnixStream::connect(&socket).unwrap();
        let read = BufReader::new(write.try_clone().unwrap());
        let mut s = Session {
            path: &socket,
            read,
            write,
        };
        let greeting = s.line().unwrap().unwrap();
        let _: Greeting = s.parse(&greeting).unwrap();
        s.execute(Command::QmpCapabilities).unwrap();
        // Negotiation is over: QEMU refuses a second one.
        let e = s.execute(Command::QmpCapabilities).unwrap_err();
        match &e {
            QmpError::Refused { class, desc, .. } => {
                assert_eq!(class, "CommandNotFound", "{e}");
                assert!(desc.contains("already complete"), "{e}");
            }
            e => panic!("{e:?}"),
        }
        s.execute(Command::Quit).unwrap();
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
