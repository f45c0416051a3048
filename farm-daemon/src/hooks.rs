//! Notify hooks: commands run when something happens to this member or its farm (it became
//! active, drained, went unhealthy, lost quorum, lost a peer, ...), with the event in
//! environment variables. Each runs in the background, bounded by its timeout (then killed);
//! its failures are logged, never fatal.

use crate::config::Hook;

/// What happened, for a hook's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// One of `config::HOOK_EVENTS`.
    pub name: &'static str,
    /// The member it is about (this one, or the peer for peer events).
    pub member: String,
    /// Human-readable detail.
    pub detail: String,
}

pub struct Hooks {
    hooks: Vec<Hook>,
    node: String,
}

impl Hooks {
    pub fn new(hooks: Vec<Hook>, node: String) -> Self {
        Self { hooks, node }
    }

    /// Runs every hook configured for `e` (in the background). Returns how many were started.
    pub fn fire(&self, e: &Event) -> usize {
        let mut n = 0;
        for h in self.hooks.iter().filter(|h| h.event == e.name) {
            n += 1;
            let (h, e, node) = (h.clone(), e.clone(), self.node.clone());
            tokio::spawn(async move {
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let mut cmd = tokio::process::Command::new(&h.command[0]);
                cmd.args(&h.command[1..])
                    .env("FARM_EVENT", e.name)
                    .env("FARM_NODE", &node)
                    .env("FARM_MEMBER", &e.member)
                    .env("FARM_DETAIL", &e.detail)
                    .env("FARM_TIME", unix.to_string());
                match crate::checks::run_bounded(cmd, &h.command[0], h.timeout).await {
                    Ok(st) if st.success() => {
                        tracing::info!("hook for {} ({}) done", e.name, h.command[0])
                    }
                    Ok(st) => {
                        tracing::warn!("hook for {} ({}) failed: {st}", e.name, h.command[0])
                    }
                    Err(err) => {
                        tracing::warn!("hook for {}: {err}", e.name)
                    }
                }
            });
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn hooks_get_the_event_and_are_bounded() {
        let dir = std::env::temp_dir().join(format!("farm-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let hooks = Hooks::new(
            vec![
                Hook {
                    event: "peer-lost".into(),
                    command: vec![
                        "sh".into(),
                        "-c".into(),
                        format!(
                            "echo \"$FARM_EVENT $FARM_NODE $FARM_MEMBER $FARM_DETAIL\" > {}",
                            out.display()
                        ),
                    ],
                    timeout: Duration::from_secs(5),
                },
                Hook {
                    event: "drained".into(),
                    command: vec!["sleep".into(), "30".into()],
                    timeout: Duration::from_secs(1),
                },
            ],
            "web1".into(),
        );
        let e = Event {
            name: "peer-lost",
            member: "web2".into(),
            detail: "not heard for 400 ms".into(),
        };
        assert_eq!(hooks.fire(&e), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !out.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "peer-lost web1 web2 not heard for 400 ms"
        );
        assert_eq!(
            hooks.fire(&Event {
                name: "unhealthy",
                member: "web1".into(),
                detail: String::new()
            }),
            0
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
