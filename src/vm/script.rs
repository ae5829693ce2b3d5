//! Boot scripts (`--boot-script`, `mkt test --script`): checked on the host
//! before a guest is asked to run them.

use super::error::RunError;
use std::io::Read;
use std::path::Path;

pub(crate) fn check_boot_script(script: &Path) -> Result<(), RunError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |why: &str| RunError::BootScript(script.into(), why.into());
    let meta = std::fs::metadata(script).map_err(|e| err(&e.to_string()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(err("not an executable file (chmod +x it)"));
    }
    let mut head = [0u8; 2];
    std::fs::File::open(script)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| err(&e.to_string()))?;
    if &head != b"#!" {
        return Err(err("has no #! line"));
    }
    Ok(())
}
