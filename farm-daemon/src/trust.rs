//! Whom farmd trusts with what it reads (its key and config files, its pin and socket
//! directories) and with the orders it takes (control clients): root and farmd's own user.

/// Whether `uid` is root or the user farmd runs as.
pub fn trusted_uid(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Whether a file mode lets group or others write.
pub fn others_may_write(mode: u32) -> bool {
    mode & 0o022 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_farmds_user_only() {
        assert!(trusted_uid(0));
        // SAFETY: geteuid has no preconditions.
        assert!(trusted_uid(unsafe { libc::geteuid() }));
        assert!(!trusted_uid(u32::MAX - 1));
        assert!(others_may_write(0o664) && others_may_write(0o646));
        assert!(!others_may_write(0o644) && !others_may_write(0o1755));
    }
}
