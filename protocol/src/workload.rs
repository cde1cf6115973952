//! Workload selectors and the `allow` rules of a link's listener.
//!
//! A listening agent attests each local connection: it finds the calling
//! process and describes it by selectors, in SPIRE's forms:
//!
//! | selector | what it names |
//! |---|---|
//! | `unix:uid:N` | the caller's user id |
//! | `unix:gid:N` | its group id |
//! | `unix:path:/ABSOLUTE/PATH` | the executable it runs |
//! | `unix:sha256:HEX` | the SHA-256 of that executable (64 hex digits) |
//! | `docker:id:ID` | the container it runs in (its id in the cgroup path) |
//! | `k8s:pod-uid:UID` | the Kubernetes pod it runs in |
//!
//! A rule is one or more selectors separated by spaces; it matches a
//! caller that has every one of them. A listener with rules admits a caller
//! that one rule matches, and refuses any other before a byte of it leaves
//! the agent. A selector the agent could not learn (the process is gone, or
//! belongs to a user whose processes the agent may not read) matches no
//! rule: a caller is never admitted on what is unknown.

use std::fmt;

/// Most rules on one link.
pub const MAX_RULES: usize = 64;

/// Most selectors in one rule.
pub const MAX_SELECTORS_PER_RULE: usize = 8;

/// Longest rule accepted.
pub const MAX_RULE_LEN: usize = 1024;

/// Longest container or pod id accepted.
const MAX_ID_LEN: usize = 128;

/// One selector of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// `unix:uid:N`.
    Uid(u32),
    /// `unix:gid:N`.
    Gid(u32),
    /// `unix:path:/PATH`.
    Path(String),
    /// `unix:sha256:HEX`.
    Sha256([u8; 32]),
    /// `docker:id:ID`.
    Container(String),
    /// `k8s:pod-uid:UID`.
    Pod(String),
}

/// Why a rule was refused, and the forms that parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// A rule that does not parse.
    #[error(
        "allow rule `{rule}`: {why}; a rule is selectors separated by spaces, each one of \
         unix:uid:N, unix:gid:N, unix:path:/ABSOLUTE/PATH, unix:sha256:HEX (64 digits), \
         docker:id:ID or k8s:pod-uid:UID, and it admits a caller that has all of them"
    )]
    Rule {
        /// The rule, as written (escaped).
        rule: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// More than [`MAX_RULES`] rules.
    #[error("more than {MAX_RULES} allow rules")]
    TooMany,
}

fn plain_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
}

impl Selector {
    /// Parses one selector.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err("a selector is TYPE:KIND:VALUE");
        };
        let Some((kind, value)) = rest.split_once(':') else {
            return Err("a selector is TYPE:KIND:VALUE");
        };
        match (scheme, kind) {
            ("unix", "uid") => value.parse().map(Self::Uid).map_err(|_| "bad uid"),
            ("unix", "gid") => value.parse().map(Self::Gid).map_err(|_| "bad gid"),
            ("unix", "path") => {
                let plain = value.starts_with('/')
                    && !value.split('/').any(|c| c == ".." || c == ".")
                    && !value.bytes().any(|c| c.is_ascii_control());
                if plain {
                    Ok(Self::Path(value.to_owned()))
                } else {
                    Err("an executable path is absolute, without . or ..")
                }
            }
            ("unix", "sha256") => {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(value, &mut digest)
                    .map_err(|_| "a SHA-256 is 64 hex digits")?;
                Ok(Self::Sha256(digest))
            }
            ("docker", "id") if plain_id(value) => Ok(Self::Container(value.to_ascii_lowercase())),
            ("k8s", "pod-uid") if plain_id(value) => Ok(Self::Pod(value.to_ascii_lowercase())),
            ("docker", "id") | ("k8s", "pod-uid") => Err("an id is letters, digits, -, _ or ."),
            _ => Err("unknown selector type"),
        }
    }

    /// Whether `workload` has this selector.
    pub fn matches(&self, workload: &Workload) -> bool {
        match self {
            Self::Uid(uid) => workload.uid == Some(*uid),
            Self::Gid(gid) => workload.gid == Some(*gid),
            Self::Path(path) => workload.path.as_deref() == Some(path.as_str()),
            Self::Sha256(digest) => workload.sha256.as_ref() == Some(digest),
            Self::Container(id) => workload.container.as_deref() == Some(id.as_str()),
            Self::Pod(uid) => workload.pod.as_deref() == Some(uid.as_str()),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(n) => write!(f, "unix:uid:{n}"),
            Self::Gid(n) => write!(f, "unix:gid:{n}"),
            Self::Path(p) => write!(f, "unix:path:{p}"),
            Self::Sha256(d) => write!(f, "unix:sha256:{}", hex::encode(d)),
            Self::Container(id) => write!(f, "docker:id:{id}"),
            Self::Pod(uid) => write!(f, "k8s:pod-uid:{uid}"),
        }
    }
}

/// One rule: every selector must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(Vec<Selector>);

impl Rule {
    /// Parses a rule: 1 to [`MAX_SELECTORS_PER_RULE`] selectors separated
    /// by spaces.
    pub fn parse(s: &str) -> Result<Self, RuleError> {
        let bad = |why| RuleError::Rule {
            rule: s
                .chars()
                .take(MAX_RULE_LEN)
                .collect::<String>()
                .escape_debug()
                .to_string(),
            why,
        };
        if s.len() > MAX_RULE_LEN {
            return Err(bad("too long"));
        }
        let selectors = s
            .split_ascii_whitespace()
            .map(|sel| Selector::parse(sel).map_err(bad))
            .collect::<Result<Vec<_>, _>>()?;
        if selectors.is_empty() {
            return Err(bad("no selector"));
        }
        if selectors.len() > MAX_SELECTORS_PER_RULE {
            return Err(bad("more than 8 selectors"));
        }
        Ok(Self(selectors))
    }

    /// A rule of one selector.
    pub fn one(selector: Selector) -> Self {
        Self(vec![selector])
    }

    /// Its selectors.
    pub fn selectors(&self) -> &[Selector] {
        &self.0
    }

    /// Whether `workload` has every selector of the rule.
    pub fn matches(&self, workload: &Workload) -> bool {
        self.0.iter().all(|s| s.matches(workload))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, s) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// Parses a link's `allow` rules: at most [`MAX_RULES`].
pub fn parse_rules(rules: &[String]) -> Result<Vec<Rule>, RuleError> {
    if rules.len() > MAX_RULES {
        return Err(RuleError::TooMany);
    }
    rules.iter().map(|r| Rule::parse(r)).collect()
}

/// What an agent learnt of a local caller; `None` where it could not learn
/// it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    /// Its process id (for logs; no rule matches on it).
    pub pid: Option<u32>,
    /// Its user id.
    pub uid: Option<u32>,
    /// Its group id.
    pub gid: Option<u32>,
    /// The executable it runs.
    pub path: Option<String>,
    /// That executable's SHA-256.
    pub sha256: Option<[u8; 32]>,
    /// The container it runs in.
    pub container: Option<String>,
    /// The Kubernetes pod it runs in.
    pub pod: Option<String>,
}

impl Workload {
    /// Its selectors, as rules write them (no pid).
    pub fn selectors(&self) -> Vec<Selector> {
        let mut out = Vec::new();
        out.extend(self.uid.map(Selector::Uid));
        out.extend(self.gid.map(Selector::Gid));
        out.extend(self.path.clone().map(Selector::Path));
        out.extend(self.sha256.map(Selector::Sha256));
        out.extend(self.container.clone().map(Selector::Container));
        out.extend(self.pod.clone().map(Selector::Pod));
        out
    }
}

impl fmt::Display for Workload {
    /// `pid:N` (or `pid:?`) then its selectors, separated by spaces: what
    /// a log line says of a caller.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid:{pid}")?,
            None => f.write_str("pid:?")?,
        }
        for s in self.selectors() {
            write!(f, " {s}")?;
        }
        Ok(())
    }
}

/// What attesting a caller takes for `rules`: whether any rule names the
/// process's executable, its hash or its container (or only uids and
/// gids).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// A rule names the executable's path or hash, or a container or pod.
    pub process: bool,
    /// A rule names an executable's SHA-256 (the agent hashes the file).
    pub sha256: bool,
}

impl Needs {
    /// What `rules` need.
    pub fn of(rules: &[Rule]) -> Self {
        let mut needs = Self::default();
        for s in rules.iter().flat_map(|r| r.selectors()) {
            match s {
                Selector::Uid(_) | Selector::Gid(_) => {}
                Selector::Sha256(_) => {
                    needs.process = true;
                    needs.sha256 = true;
                }
                Selector::Path(_) | Selector::Container(_) | Selector::Pod(_) => {
                    needs.process = true;
                }
            }
        }
        needs
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn caller() -> Workload {
        Workload {
            pid: Some(42),
            uid: Some(1000),
            gid: Some(100),
            path: Some("/usr/bin/app".into()),
            sha256: Some([0xab; 32]),
            container: None,
            pod: None,
        }
    }

    #[test]
    fn a_rule_matches_a_caller_with_all_its_selectors() {
        let w = caller();
        assert!(Rule::parse("unix:uid:1000").expect("parse").matches(&w));
        assert!(
            Rule::parse("unix:uid:1000  unix:path:/usr/bin/app")
                .expect("parse")
                .matches(&w)
        );
        assert!(
            !Rule::parse("unix:uid:1000 unix:gid:7")
                .expect("parse")
                .matches(&w)
        );
        assert!(
            !Rule::parse("unix:path:/usr/bin/other")
                .expect("parse")
                .matches(&w)
        );
        let hash = format!("unix:sha256:{}", "AB".repeat(32));
        assert!(Rule::parse(&hash).expect("parse").matches(&w));
        // What the agent could not learn matches nothing.
        assert!(!Rule::parse("docker:id:abc").expect("parse").matches(&w));
        assert!(
            !Rule::parse("unix:uid:1000")
                .expect("parse")
                .matches(&Workload::default())
        );
    }

    #[test]
    fn bad_rules_are_refused_with_the_forms() {
        for bad in [
            "",
            "   ",
            "unix:uid:x",
            "unix:uid",
            "uid:1000",
            "unix:path:relative/app",
            "unix:path:/usr/../bin/sh",
            "unix:sha256:abcd",
            "docker:id:a/b",
            "spiffe://x/y",
        ] {
            let e = Rule::parse(bad).expect_err("refused");
            assert!(e.to_string().contains("unix:uid:N"), "{e}");
        }
        let nine = ["unix:uid:1"; 9].join(" ");
        assert!(Rule::parse(&nine).is_err());
        assert!(Rule::parse(&"x".repeat(MAX_RULE_LEN + 1)).is_err());
        assert_eq!(
            parse_rules(&vec!["unix:uid:1".to_owned(); MAX_RULES + 1]),
            Err(RuleError::TooMany)
        );
    }

    #[test]
    fn needs_follow_the_selectors() {
        let rules = |r: &[&str]| {
            Needs::of(
                &parse_rules(&r.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("parse"),
            )
        };
        assert_eq!(rules(&["unix:uid:1 unix:gid:2"]), Needs::default());
        assert_eq!(
            rules(&["unix:uid:1", "unix:path:/bin/x"]),
            Needs {
                process: true,
                sha256: false
            }
        );
        assert!(rules(&[&format!("unix:sha256:{}", "0".repeat(64))]).sha256);
    }

    #[test]
    fn display_round_trips() {
        let w = caller();
        let shown = w.to_string();
        assert!(shown.starts_with("pid:42 unix:uid:1000 unix:gid:100 unix:path:/usr/bin/app"));
        let all = w
            .selectors()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>();
        let rule = Rule::parse(&all.join(" ")).expect("parse");
        assert!(rule.matches(&w));
        assert_eq!(Rule::parse(&rule.to_string()).expect("parse"), rule);
    }

    proptest! {
        #[test]
        fn arbitrary_rules_never_panic(s in ".{0,200}") {
            if let Ok(rule) = Rule::parse(&s) {
                prop_assert_eq!(Rule::parse(&rule.to_string()).expect("parse"), rule);
            }
        }
    }
}
