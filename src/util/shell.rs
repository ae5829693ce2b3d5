//! Words for a POSIX shell: `--dry-run`, logs, the command ssh hands to
//! the guest, generated scripts.

/// Renders `argv` for a POSIX shell (`--dry-run`, logs, the command line
/// ssh hands to the guest's shell): each word comes back as exactly that
/// word. Words with anything but safe characters are single-quoted; a
/// first word with `=` is too, as the shell would take it for an assignment.
pub fn shell_quote(argv: &[String]) -> String {
    argv.iter()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 && w.contains('=') {
                format!("'{}'", w.replace('\'', r"'\''"))
            } else {
                quote_word(w)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One word for a POSIX shell: as is when it is made of safe characters,
/// else single-quoted.
pub(crate) fn quote_word(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        // Inside single quotes only `'` is special: close, escape, reopen.
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_table() {
        let cases: [(&[&str], &str); 7] = [
            (&["qemu", "-m", "512M"], "qemu -m 512M"),
            (
                &["-append", "console=ttyS0 quiet"],
                "-append 'console=ttyS0 quiet'",
            ),
            (&["it's"], r"'it'\''s'"),
            (&[""], "''"),
            (&["a;b", "$HOME", "*", "~"], "'a;b' '$HOME' '*' '~'"),
            (&["A=1", "b=2"], "'A=1' b=2"),
            (
                &["-fsdev", "path=/a,,b,server=on", "x@y%z+1"],
                "-fsdev path=/a,,b,server=on x@y%z+1",
            ),
        ];
        for (argv, want) in cases {
            assert_eq!(
                shell_quote(&argv.iter().map(|w| w.to_string()).collect::<Vec<_>>()),
                want,
                "{argv:?}"
            );
        }
    }
}
