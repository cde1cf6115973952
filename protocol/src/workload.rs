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
//! caller that has every one of them. A rule may start with a SPIFFE ID
//! (`spiffe://TRUST-DOMAIN/PATH`): the identity of the callers it matches,
//! as a SPIRE registration entry maps selectors to one.
//!
//! A listener with rules admits a caller that one rule matches, and
//! refuses any other before a byte of it leaves the agent. A selector the
//! agent could not learn (the process is gone, or belongs to a user whose
//! processes the agent may not read) matches no rule: a caller is never
//! admitted on what is unknown.
//!
//! The listening agent tells the target's agent who called, inside the
//! end-to-end encrypted `Open` of each flow ([`CallerIdentity`]): the
//! relay can neither read nor change it. The target's agent checks it
//! against the same rules, and can hand it to the service in a PROXY
//! protocol v2 header.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};

/// Most rules on one link.
pub const MAX_RULES: usize = 64;

/// Most selectors in one rule.
pub const MAX_SELECTORS_PER_RULE: usize = 8;

/// Longest rule accepted.
pub const MAX_RULE_LEN: usize = 1024;

/// Longest container or pod id accepted.
const MAX_ID_LEN: usize = 128;

/// Longest encoded [`CallerIdentity`].
pub const MAX_CALLER_LEN: usize = 4096;

/// Most selectors a [`CallerIdentity`] carries.
pub const MAX_CALLER_SELECTORS: usize = 16;

pub use crate::spiffe::{MAX_SPIFFE_ID_LEN, check_spiffe_id};

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
        "allow rule `{rule}`: {why}; a rule is an optional SPIFFE ID (spiffe://DOMAIN/PATH) \
         then selectors, separated by spaces, each one of unix:uid:N, unix:gid:N, \
         unix:path:/ABSOLUTE/PATH, unix:sha256:HEX (64 digits), docker:id:ID or \
         k8s:pod-uid:UID, and it admits a caller that has all of them"
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
    /// Parses one selector, at most [`MAX_RULE_LEN`] bytes.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        if s.len() > MAX_RULE_LEN {
            return Err("a selector is at most 1024 bytes");
        }
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
                // No space either: selectors are separated by spaces.
                let plain = value.starts_with('/')
                    && !value.split('/').any(|c| c == ".." || c == ".")
                    && !value
                        .bytes()
                        .any(|c| c.is_ascii_control() || c.is_ascii_whitespace());
                if plain {
                    Ok(Self::Path(value.to_owned()))
                } else {
                    Err("an executable path is absolute, without . or .. or spaces")
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

/// One rule: every selector must match; its callers are `id`, if it
/// names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    id: Option<String>,
    selectors: Vec<Selector>,
}

impl Rule {
    /// Parses a rule: an optional SPIFFE ID, then 1 to
    /// [`MAX_SELECTORS_PER_RULE`] selectors, separated by spaces.
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
        let mut words = s.split_ascii_whitespace().peekable();
        let id = match words.peek() {
            Some(w) if w.starts_with("spiffe:") => {
                check_spiffe_id(w).map_err(bad)?;
                words.next().map(str::to_owned)
            }
            _ => None,
        };
        let selectors = words
            .map(|sel| Selector::parse(sel).map_err(bad))
            .collect::<Result<Vec<_>, _>>()?;
        if selectors.is_empty() {
            return Err(bad("no selector"));
        }
        if selectors.len() > MAX_SELECTORS_PER_RULE {
            return Err(bad("more than 8 selectors"));
        }
        Ok(Self { id, selectors })
    }

    /// A rule of one selector.
    pub fn one(selector: Selector) -> Self {
        Self {
            id: None,
            selectors: vec![selector],
        }
    }

    /// The SPIFFE ID of the callers it matches, if it names one.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Its selectors.
    pub fn selectors(&self) -> &[Selector] {
        &self.selectors
    }

    /// Whether `workload` has every selector of the rule.
    pub fn matches(&self, workload: &Workload) -> bool {
        self.selectors.iter().all(|s| s.matches(workload))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(id) = &self.id {
            write!(f, "{id} ")?;
        }
        for (n, s) in self.selectors.iter().enumerate() {
            if n > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// The first of `rules` that matches `workload`: the caller is admitted,
/// as that rule's identity.
pub fn first_match<'r>(rules: &'r [Rule], workload: &Workload) -> Option<&'r Rule> {
    rules.iter().find(|r| r.matches(workload))
}

/// Who opened a flow, as the listening agent attested it: sealed in the
/// flow's `Open`, end to end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerIdentity {
    /// The SPIFFE ID of the rule that admitted the caller, if it names one.
    pub id: Option<String>,
    /// The caller's selectors, as rules write them (no pid).
    pub selectors: Vec<String>,
}

impl CallerIdentity {
    /// What a caller admitted by `rule` (if any) is.
    pub fn of(workload: &Workload, rule: Option<&Rule>) -> Self {
        Self {
            id: rule.and_then(|r| r.id.clone()),
            selectors: workload.selectors().iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Encodes it, for an `Open`'s payload.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    /// Decodes an `Open`'s payload: at most [`MAX_CALLER_LEN`] bytes, a
    /// valid SPIFFE ID, at most [`MAX_CALLER_SELECTORS`] selectors that
    /// parse, each kind at most once.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let caller = codec::decode::<Self, MAX_CALLER_LEN>(bytes)?;
        let bad = |why: &str| CodecError::Malformed(format!("caller identity: {why}"));
        if let Some(id) = &caller.id {
            check_spiffe_id(id).map_err(bad)?;
        }
        if caller.selectors.len() > MAX_CALLER_SELECTORS {
            return Err(bad("too many selectors"));
        }
        caller.workload().map_err(bad)?;
        Ok(caller)
    }

    /// The workload its selectors describe (pid unknown).
    pub fn workload(&self) -> Result<Workload, &'static str> {
        let mut w = Workload::default();
        for s in &self.selectors {
            let twice = match Selector::parse(s)? {
                Selector::Uid(n) => w.uid.replace(n).is_some(),
                Selector::Gid(n) => w.gid.replace(n).is_some(),
                Selector::Path(p) => w.path.replace(p).is_some(),
                Selector::Sha256(d) => w.sha256.replace(d).is_some(),
                Selector::Container(c) => w.container.replace(c).is_some(),
                Selector::Pod(p) => w.pod.replace(p).is_some(),
            };
            if twice {
                return Err("a selector kind given twice");
            }
        }
        Ok(w)
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

/// PROXY protocol v2 TLV type of the caller's SPIFFE ID (from the
/// protocol's custom range, as proposed for Linkerd).
pub const PP2_TYPE_SPIFFE_ID: u8 = 0xE0;

/// PROXY protocol v2 TLV type of the caller's selectors, separated by
/// spaces.
pub const PP2_TYPE_SELECTORS: u8 = 0xE1;

/// The PROXY protocol v2 header that starts a flow's target connection:
/// command PROXY, no addresses (`AF_UNSPEC`: the target agent never learns
/// where the caller is), and the caller's SPIFFE ID and selectors as TLVs
/// where known.
pub fn proxy_v2_header(caller: Option<&CallerIdentity>) -> Vec<u8> {
    const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut tlvs = Vec::new();
    let mut tlv = |kind: u8, value: &[u8]| {
        // Both values are bounded by MAX_CALLER_LEN, far below u16::MAX.
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        tlvs.push(kind);
        tlvs.extend_from_slice(&len.to_be_bytes());
        tlvs.extend_from_slice(&value[..usize::from(len)]);
    };
    if let Some(c) = caller {
        if let Some(id) = &c.id {
            tlv(PP2_TYPE_SPIFFE_ID, id.as_bytes());
        }
        if !c.selectors.is_empty() {
            tlv(PP2_TYPE_SELECTORS, c.selectors.join(" ").as_bytes());
        }
    }
    let mut header = Vec::with_capacity(16 + tlvs.len());
    header.extend_from_slice(SIGNATURE);
    header.push(0x21); // version 2, PROXY
    header.push(0x00); // AF_UNSPEC, UNSPEC
    header.extend_from_slice(&u16::try_from(tlvs.len()).unwrap_or(0).to_be_bytes());
    header.extend_from_slice(&tlvs);
    header
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
            "unix:path:/opt/my\tapp",
            "unix:sha256:abcd",
            "docker:id:a/b",
            "spiffe://x/y",
        ] {
            let e = Rule::parse(bad).expect_err("refused");
            assert!(e.to_string().contains("unix:uid:N"), "{e}");
        }
        let long_path = format!("unix:path:/{}", "a".repeat(MAX_RULE_LEN));
        assert!(Selector::parse(&long_path).is_err());
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

    #[test]
    fn proxy_v2_header_snapshot() {
        let signature = "0d0a0d0a000d0a515549540a";
        assert_eq!(
            hex::encode(proxy_v2_header(None)),
            format!("{signature}21000000")
        );
        let caller = CallerIdentity {
            id: Some("spiffe://e.org/a".into()),
            selectors: vec!["unix:uid:1".into(), "unix:gid:2".into()],
        };
        let tlv_id = format!("e00010{}", hex::encode("spiffe://e.org/a"));
        let tlv_sel = format!("e10015{}", hex::encode("unix:uid:1 unix:gid:2"));
        assert_eq!(
            hex::encode(proxy_v2_header(Some(&caller))),
            format!("{signature}2100002b{tlv_id}{tlv_sel}")
        );
    }

    #[test]
    fn a_rule_may_name_the_identity_of_its_callers() {
        let rule =
            Rule::parse("spiffe://example.org/billing unix:path:/usr/bin/app").expect("parse");
        assert_eq!(rule.id(), Some("spiffe://example.org/billing"));
        assert!(rule.matches(&caller()));
        assert_eq!(Rule::parse(&rule.to_string()).expect("parse"), rule);
        // An ID alone admits no one; only the first word may be one.
        assert!(Rule::parse("spiffe://example.org/billing").is_err());
        assert!(Rule::parse("unix:uid:1 spiffe://example.org/billing").is_err());
        assert!(Rule::parse("spiffe://Bad/x unix:uid:1").is_err());
        let rules = parse_rules(&[
            "spiffe://example.org/other unix:uid:7".to_owned(),
            "spiffe://example.org/billing unix:uid:1000".to_owned(),
            "unix:gid:100".to_owned(),
        ])
        .expect("parse");
        let first = first_match(&rules, &caller()).expect("a match");
        assert_eq!(first.id(), Some("spiffe://example.org/billing"));
    }

    #[test]
    fn a_caller_identity_round_trips_and_bad_ones_are_refused() {
        let rule = Rule::parse("spiffe://example.org/billing unix:uid:1000").expect("parse");
        let id = CallerIdentity::of(&caller(), Some(&rule));
        assert_eq!(id.id.as_deref(), Some("spiffe://example.org/billing"));
        let bytes = id.encode().expect("encode");
        let back = CallerIdentity::decode(&bytes).expect("decode");
        assert_eq!(back, id);
        let mut w = caller();
        w.pid = None;
        assert_eq!(back.workload(), Ok(w));
        let forged = |id: Option<&str>, selectors: Vec<String>| {
            CallerIdentity {
                id: id.map(Into::into),
                selectors,
            }
            .encode()
            .expect("encode")
        };
        for bytes in [
            forged(Some("spiffe://Bad/x"), vec![]),
            forged(None, vec!["unix:uid:x".into()]),
            forged(None, vec!["unix:uid:1".into(), "unix:uid:2".into()]),
            forged(None, vec!["unix:gid:1".into(); MAX_CALLER_SELECTORS + 1]),
            forged(None, vec!["x".repeat(MAX_CALLER_LEN)]),
        ] {
            assert!(CallerIdentity::decode(&bytes).is_err());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_caller_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(c) = CallerIdentity::decode(&bytes) {
                prop_assert_eq!(CallerIdentity::decode(&c.encode().expect("encode")).expect("decode"), c);
            }
        }

        #[test]
        fn callers_round_trip(uid in any::<u32>(), gid in any::<u32>(), path in "(/[a-z0-9_-]{1,12}){1,4}") {
            let w = Workload { uid: Some(uid), gid: Some(gid), path: Some(path), ..Workload::default() };
            let c = CallerIdentity::of(&w, None);
            let back = CallerIdentity::decode(&c.encode().expect("encode")).expect("decode");
            prop_assert_eq!(back.workload(), Ok(w));
        }

        #[test]
        fn arbitrary_rules_never_panic(s in ".{0,200}") {
            if let Ok(rule) = Rule::parse(&s) {
                prop_assert_eq!(Rule::parse(&rule.to_string()).expect("parse"), rule);
            }
        }
    }
}
