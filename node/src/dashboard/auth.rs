//! Who may use the dashboard: the session token, its cookie, the CSRF token of forms, and the
//! `Host`/`Origin` checks that keep other web pages (DNS rebinding, cross-site forms) out.
//!
//! The dashboard acts with the admin kit's full rights, so every request must prove it knows
//! the session token: as `?token=` (the URL printed at start) or as the cookie that such a
//! request sets. Secrets are compared in constant time, through `ring::hmac::verify`. The
//! cookie and the CSRF token are HMACs of the session token under their own labels, so
//! neither is the token itself and one cannot stand in for the other.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Fewest characters a token from `--token-file` may have.
pub const MIN_TOKEN_LEN: usize = 32;
/// Most characters a token may have (it travels in URLs and cookies).
pub const MAX_TOKEN_LEN: usize = 256;
/// Label of the cookie's HMAC.
const COOKIE_LABEL: &[u8] = b"flare-dashboard/cookie/v1";
/// Label of the CSRF token's HMAC.
const CSRF_LABEL: &[u8] = b"flare-dashboard/csrf/v1";

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file cannot be read.
    #[error("token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The token is too short or too long.
    #[error("the token must have {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters, not {0}")]
    Length(usize),
    /// The token has a character that cannot go in a URL as it is.
    #[error("the token may only have letters, digits, '-', '_', '.' and '~'")]
    Charset,
    /// The system's random generator failed.
    #[error("no randomness from the system")]
    Random,
}

/// The session token. Printed once at start; never logged (`Debug` hides it).
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A fresh random token: 32 bytes from the system, in hex.
    pub fn generate() -> Result<Token, TokenError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| TokenError::Random)?;
        Ok(Token(hex::encode(bytes)))
    }

    /// The token in `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Token::parse(text.trim())
    }

    /// Checks a token's length and characters (URL-unreserved only, so it needs no escaping).
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        let n = s.chars().count();
        if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&n) {
            return Err(TokenError::Length(n));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
        {
            return Err(TokenError::Charset);
        }
        Ok(Token(s.to_string()))
    }

    /// The token, for the one URL printed at start.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

/// The dashboard's checks, made once at start from the token and the listen address.
#[derive(Debug)]
pub struct Guard {
    /// A random key that only exists to compare candidate tokens in constant time.
    check_key: hmac::Key,
    /// The session token under `check_key`.
    token_tag: hmac::Tag,
    /// Keyed with the session token: the cookie and CSRF values are HMACs under it.
    derive_key: hmac::Key,
    /// The cookie's name, with the port: cookies do not tell ports apart, and two dashboards
    /// on one machine must not overwrite each other's.
    cookie_name: String,
    /// Where the dashboard listens (the real port, after binding port 0).
    listen: SocketAddr,
}

impl Guard {
    /// The checks for `token` on a dashboard bound to `listen`.
    pub fn new(token: &Token, listen: SocketAddr) -> Result<Guard, TokenError> {
        let rng = SystemRandom::new();
        let check_key =
            hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| TokenError::Random)?;
        let token_tag = hmac::sign(&check_key, token.0.as_bytes());
        Ok(Guard {
            check_key,
            token_tag,
            derive_key: hmac::Key::new(hmac::HMAC_SHA256, token.0.as_bytes()),
            cookie_name: format!("flare_dashboard_{}", listen.port()),
            listen,
        })
    }

    /// Whether `candidate` is the session token (constant time).
    pub fn token_ok(&self, candidate: &str) -> bool {
        hmac::verify(
            &self.check_key,
            candidate.as_bytes(),
            self.token_tag.as_ref(),
        )
        .is_ok()
    }

    fn derived(&self, label: &[u8]) -> String {
        hex::encode(hmac::sign(&self.derive_key, label).as_ref())
    }

    fn derived_ok(&self, label: &[u8], candidate: &str) -> bool {
        match hex::decode(candidate) {
            Ok(tag) => hmac::verify(&self.derive_key, label, &tag).is_ok(),
            Err(_) => false,
        }
    }

    /// The `Set-Cookie` value a request with the right `?token=` gets.
    pub fn set_cookie(&self) -> String {
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            self.cookie_name,
            self.derived(COOKIE_LABEL)
        )
    }

    /// Whether a `Cookie` header carries the session cookie.
    pub fn cookie_ok(&self, header: &str) -> bool {
        header
            .split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == self.cookie_name && self.derived_ok(COOKIE_LABEL, v))
    }

    /// The CSRF token forms carry.
    pub fn csrf(&self) -> String {
        self.derived(CSRF_LABEL)
    }

    /// Whether a form's CSRF field is right (constant time).
    pub fn csrf_ok(&self, candidate: &str) -> bool {
        self.derived_ok(CSRF_LABEL, candidate)
    }

    /// Whether a `Host` header names this dashboard: the listen address, or for a loopback
    /// one also `localhost`, `127.0.0.1` and `[::1]`, always with the port. A dashboard
    /// listening on every interface (`0.0.0.0`) takes an IP literal with the port (a DNS
    /// rebinding attack needs a name of its own). Anything else is another site's page
    /// that a DNS answer pointed here.
    pub fn host_ok(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        if port != self.listen.port() {
            return false;
        }
        let ip = self.listen.ip();
        let literal = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name)
            .parse::<IpAddr>()
            .ok();
        if ip.is_unspecified() {
            return literal.is_some() || name.eq_ignore_ascii_case("localhost");
        }
        if ip.is_loopback() {
            return name.eq_ignore_ascii_case("localhost")
                || literal.is_some_and(|a| a.is_loopback());
        }
        literal == Some(ip)
    }

    /// Whether a state-changing request's `Origin` (or else `Referer`) is this dashboard's
    /// page at `host` (the request's checked `Host`). Neither present passes: old clients and
    /// scripts send none, and the CSRF field is still required.
    pub fn origin_ok(&self, host: &str, origin: Option<&str>, referer: Option<&str>) -> bool {
        let ours = format!("http://{host}");
        if let Some(o) = origin {
            return o.eq_ignore_ascii_case(&ours);
        }
        if let Some(r) = referer {
            return r.len() > ours.len()
                && r.get(..ours.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(&ours))
                && r.as_bytes().get(ours.len()) == Some(&b'/');
        }
        true
    }
}

/// `name:port` (or `[v6]:port`) → (name, port).
fn split_host(host: &str) -> Option<(&str, u16)> {
    let (name, port) = host.rsplit_once(':')?;
    if name.is_empty() || (name.contains(':') && !name.starts_with('[')) {
        return None;
    }
    Some((name, port.parse().ok()?))
}

/// Takes `token=…` out of a query string: the token, and the query without it.
pub fn take_token(query: &str) -> (Option<&str>, String) {
    let mut token = None;
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.strip_prefix("token=") {
            Some(t) if token.is_none() => token = Some(t),
            _ => rest.push(kv),
        }
    }
    (token, rest.join("&"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn guard(listen: &str) -> Guard {
        Guard::new(&Token::parse(TOKEN).unwrap(), listen.parse().unwrap()).unwrap()
    }

    #[test]
    fn tokens_are_checked_for_length_and_characters() {
        let cases: [(&str, bool); 6] = [
            (TOKEN, true),
            (&TOKEN[1..], false),
            ("short", false),
            ("0123456789abcdef0123456789abcdeF-_.~", true),
            ("0123456789abcdef0123456789abcdef&x=1", false),
            ("0123456789abcdef 0123456789abcdef", false),
        ];
        for (t, ok) in cases {
            assert_eq!(Token::parse(t).is_ok(), ok, "{t}");
        }
        assert!(Token::parse(&"a".repeat(MAX_TOKEN_LEN + 1)).is_err());
        let g = Token::generate().unwrap();
        assert_eq!(g.reveal().len(), 64);
        assert!(Token::parse(g.reveal()).is_ok());
        assert_ne!(g.reveal(), Token::generate().unwrap().reveal());
        assert_eq!(format!("{g:?}"), "Token(..)");
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, format!("  {TOKEN}\n")).unwrap();
        assert_eq!(Token::from_file(&p).unwrap().reveal(), TOKEN);
        std::fs::write(&p, "too-short\n").unwrap();
        assert!(matches!(Token::from_file(&p), Err(TokenError::Length(9))));
        assert!(Token::from_file(&dir.path().join("none")).is_err());
    }

    #[test]
    fn only_the_session_token_passes() {
        let g = guard("127.0.0.1:8443");
        assert!(g.token_ok(TOKEN));
        for bad in ["", "0123456789abcdef0123456789abcdee", &TOKEN[..31], "x"] {
            assert!(!g.token_ok(bad), "{bad}");
        }
    }

    #[test]
    fn the_cookie_is_named_by_port_and_derived_from_the_token() {
        let g = guard("127.0.0.1:8443");
        let set = g.set_cookie();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        let pair = set.split(';').next().unwrap();
        assert!(pair.starts_with("flare_dashboard_8443="));
        assert!(!pair.contains(TOKEN));
        assert!(g.cookie_ok(&format!("a=b; {pair}; c=d")));
        let value = pair.split_once('=').unwrap().1;
        let cases = [
            String::new(),
            format!("flare_dashboard_8443={TOKEN}"),
            format!("flare_dashboard_9000={value}"),
            format!("flare_dashboard_8443={}", g.csrf()),
            "flare_dashboard_8443=zz".to_string(),
        ];
        for c in cases {
            assert!(!g.cookie_ok(&c), "{c}");
        }
        // Another token's dashboard on the same port does not accept this cookie.
        let other = Guard::new(
            &Token::parse("fedcba9876543210fedcba9876543210").unwrap(),
            "127.0.0.1:8443".parse().unwrap(),
        )
        .unwrap();
        assert!(!other.cookie_ok(pair));
    }

    #[test]
    fn csrf_token_is_an_hmac_of_the_session_token() {
        let g = guard("127.0.0.1:8443");
        let csrf = g.csrf();
        assert_eq!(csrf.len(), 64);
        assert!(g.csrf_ok(&csrf));
        assert!(!g.csrf_ok(TOKEN));
        assert!(!g.csrf_ok(""));
        assert!(!g.csrf_ok(&csrf[..62]));
        assert!(!g.csrf_ok("not hex at all"));
    }

    #[test]
    fn host_header_must_name_the_dashboard() {
        let cases: [(&str, &str, bool); 16] = [
            ("127.0.0.1:8443", "127.0.0.1:8443", true),
            ("127.0.0.1:8443", "localhost:8443", true),
            ("127.0.0.1:8443", "LOCALHOST:8443", true),
            ("127.0.0.1:8443", "[::1]:8443", true),
            ("127.0.0.1:8443", "127.0.0.1:8444", false),
            ("127.0.0.1:8443", "127.0.0.1", false),
            ("127.0.0.1:8443", "evil.example:8443", false),
            ("127.0.0.1:8443", "localhost.evil.example:8443", false),
            ("127.0.0.1:8443", "10.0.0.1:8443", false),
            ("127.0.0.1:8443", "", false),
            ("10.1.2.3:80", "10.1.2.3:80", true),
            ("10.1.2.3:80", "localhost:80", false),
            ("10.1.2.3:80", "evil.example:80", false),
            ("0.0.0.0:80", "192.168.1.9:80", true),
            ("0.0.0.0:80", "evil.example:80", false),
            ("[::1]:80", "[::1]:80", true),
        ];
        for (listen, host, ok) in cases {
            assert_eq!(guard(listen).host_ok(host), ok, "{listen} {host}");
        }
    }

    #[test]
    fn origin_or_referer_must_be_the_dashboard_when_present() {
        let g = guard("127.0.0.1:8443");
        let h = "127.0.0.1:8443";
        let cases: [(Option<&str>, Option<&str>, bool); 9] = [
            (None, None, true),
            (Some("http://127.0.0.1:8443"), None, true),
            (Some("http://evil.example"), None, false),
            (Some("null"), None, false),
            (Some("http://127.0.0.1:8443.evil.example"), None, false),
            (None, Some("http://127.0.0.1:8443/jobs/x"), true),
            (None, Some("http://127.0.0.1:8443.evil.example/"), false),
            (
                None,
                Some("http://evil.example/http://127.0.0.1:8443/"),
                false,
            ),
            // Origin wins over Referer.
            (
                Some("http://evil.example"),
                Some("http://127.0.0.1:8443/"),
                false,
            ),
        ];
        for (o, r, ok) in cases {
            assert_eq!(g.origin_ok(h, o, r), ok, "{o:?} {r:?}");
        }
    }

    #[test]
    fn token_is_taken_out_of_the_query() {
        assert_eq!(take_token("token=abc"), (Some("abc"), String::new()));
        assert_eq!(
            take_token("a=1&token=abc&b=2"),
            (Some("abc"), "a=1&b=2".into())
        );
        assert_eq!(take_token("a=1"), (None, "a=1".into()));
        assert_eq!(take_token(""), (None, String::new()));
    }
}
