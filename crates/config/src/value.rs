//! Value syntaxes shared by many settings: durations, byte sizes, name lists, listen addresses,
//! and the keyword settings. Each parses inside `Deserialize`, so a bad value is reported with its
//! key path and line.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::{AuthType, FailMode, LogFormat, PoolMode};

/// The longest duration accepted anywhere. Longer values are almost certainly a unit mistake, and
/// the bound keeps `Instant + duration` arithmetic elsewhere from overflowing.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration: a number of seconds (`5`, `0.25`) or a string with a unit (`"250ms"`, `"5s"`,
/// `"2m"`, `"1h"`, `"1d"`; a bare number string means seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dur(pub(crate) Duration);

impl Dur {
    pub(crate) const fn secs(secs: u64) -> Dur {
        Dur(Duration::from_secs(secs))
    }

    pub(crate) const fn millis(millis: u64) -> Dur {
        Dur(Duration::from_millis(millis))
    }

    /// PgBouncer semantics for optional timeouts: `0` disables.
    pub(crate) fn or_disabled(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

const DURATION_FORMS: &str =
    "a number of seconds or a string with a unit such as \"250ms\", \"5s\", \"2m\", \"1h\", \"1d\"";

/// Converts fractional seconds, rejecting what no timeout can be.
fn duration_from_secs(secs: f64) -> Result<Duration, String> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("a duration must be zero or positive, got {secs}"));
    }
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!(
            "the duration is too long: {secs}s (the maximum is 365 days)"
        ));
    }
    // Round to whole nanoseconds so that "1ms" is exactly one millisecond.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // bounded above
    let nanos = (secs * 1e9).round() as u64;
    Ok(Duration::from_nanos(nanos))
}

/// Parses `"250ms"`, `"1.5s"`, `"2m"`, `"1h"`, `"1d"`, or `"30"` (seconds).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: expected {DURATION_FORMS}");
    let text_trimmed = text.trim();
    let split = text_trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text_trimmed.len());
    let (number, unit) = text_trimmed.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 {
        return Err(bad());
    }
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(bad()),
    };
    duration_from_secs(number * scale)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurVisitor;

        impl Visitor<'_> for DurVisitor {
            type Value = Dur;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a duration: {DURATION_FORMS}")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                let secs = u64::try_from(v).map_err(|_| {
                    E::custom(format!("a duration must be zero or positive, got {v}"))
                })?;
                self.visit_u64(secs)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                if v > MAX_DURATION.as_secs() {
                    return Err(E::custom(format!(
                        "the duration is too long: {v}s (the maximum is 365 days)"
                    )));
                }
                Ok(Dur::secs(v))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                duration_from_secs(v).map(Dur).map_err(E::custom)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(DurVisitor)
    }
}

/// A byte count: an integer, or a string with a binary unit (`"64KiB"`, `"16MiB"`, `"1GiB"`;
/// `kB`/`MB`/`GB` mean the same, as in PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub(crate) u64);

const SIZE_FORMS: &str = "a number of bytes or a string such as \"64KiB\", \"16MiB\", \"1GiB\"";

/// Parses `"16MiB"`, `"64 KiB"`, `"1GB"` (1024-based), `"512B"`, or `"4096"`.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {text:?}: expected {SIZE_FORMS}");
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("the size {text:?} is too large"))
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = Size;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a size: {SIZE_FORMS}")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("a size must be zero or positive, got {v}")))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A list of names: a TOML array of strings, or one comma-separated string (PgBouncer style).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NameList(pub(crate) Vec<String>);

impl<'de> Deserialize<'de> for NameList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;

        impl<'de> Visitor<'de> for ListVisitor {
            type Value = NameList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of names or a comma-separated string of names")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<NameList, E> {
                let names = v.split(',').map(str::trim).filter(|s| !s.is_empty());
                Ok(NameList(names.map(str::to_owned).collect()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NameList, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    let name = name.trim();
                    if name.is_empty() {
                        return Err(de::Error::custom("a name in the list is empty"));
                    }
                    names.push(name.to_owned());
                }
                Ok(NameList(names))
            }
        }

        deserializer.deserialize_any(ListVisitor)
    }
}

/// Addresses to listen on: `"127.0.0.1"`, `"*"` (every IPv4 and IPv6 address), a comma-separated
/// string, or an array of strings. `"localhost"` means 127.0.0.1. Duplicates are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenAddrs(pub(crate) Vec<IpAddr>);

impl ListenAddrs {
    fn push(&mut self, item: &str) -> Result<(), String> {
        let item = item.trim();
        let addrs: Vec<IpAddr> = match item {
            "*" => vec![
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
            "localhost" => vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            _ => {
                let bare = item
                    .strip_prefix('[')
                    .and_then(|s| s.strip_suffix(']'))
                    .unwrap_or(item);
                let addr = bare.parse().map_err(|_| {
                    format!(
                        "{item:?} is not an IP address (give addresses such as \"127.0.0.1\" or \
                         \"::1\", or \"*\" for every address)"
                    )
                })?;
                vec![addr]
            }
        };
        for addr in addrs {
            if !self.0.contains(&addr) {
                self.0.push(addr);
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for ListenAddrs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AddrVisitor;

        impl<'de> Visitor<'de> for AddrVisitor {
            type Value = ListenAddrs;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an IP address, \"*\", a comma-separated string or an array of addresses",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ListenAddrs, E> {
                let mut addrs = ListenAddrs(Vec::new());
                for item in v.split(',').filter(|s| !s.trim().is_empty()) {
                    addrs.push(item).map_err(E::custom)?;
                }
                Ok(addrs)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ListenAddrs, A::Error> {
                let mut addrs = ListenAddrs(Vec::new());
                while let Some(item) = seq.next_element::<String>()? {
                    addrs.push(&item).map_err(de::Error::custom)?;
                }
                Ok(addrs)
            }
        }

        deserializer.deserialize_any(AddrVisitor)
    }
}

/// Defines a private wrapper that deserializes a keyword setting from a string.
macro_rules! keyword {
    ($wrapper:ident, $target:ty, $parse:path) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
        #[serde(try_from = "String")]
        pub(crate) struct $wrapper(pub(crate) $target);

        impl TryFrom<String> for $wrapper {
            type Error = String;

            fn try_from(text: String) -> Result<Self, String> {
                $parse(&text).map($wrapper)
            }
        }
    };
}

keyword!(PoolModeValue, PoolMode, parse_pool_mode);
keyword!(AuthTypeValue, AuthType, parse_auth_type);
keyword!(LogFormatValue, LogFormat, parse_log_format);
keyword!(FailModeValue, FailMode, parse_fail_mode);

fn parse_pool_mode(text: &str) -> Result<PoolMode, String> {
    match text {
        "transaction" => Ok(PoolMode::Transaction),
        "session" | "statement" => Err(format!(
            "pool_mode {text:?} is not available: only \"transaction\" is supported"
        )),
        _ => Err(format!(
            "unknown pool_mode {text:?}: only \"transaction\" is supported"
        )),
    }
}

fn parse_auth_type(text: &str) -> Result<AuthType, String> {
    match text.to_ascii_lowercase().as_str() {
        "scram-sha-256" => Ok(AuthType::ScramSha256),
        "md5" => Ok(AuthType::Md5),
        "trust" => Ok(AuthType::Trust),
        _ => Err(format!(
            "unsupported auth_type {text:?}: expected \"scram-sha-256\", \"md5\" or \"trust\""
        )),
    }
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!(
            "unknown log_format {text:?}: expected \"text\" or \"json\""
        )),
    }
}

fn parse_fail_mode(text: &str) -> Result<FailMode, String> {
    match text {
        "open" => Ok(FailMode::Open),
        "closed" => Ok(FailMode::Closed),
        _ => Err(format!(
            "unknown fail mode {text:?}: expected \"open\" or \"closed\""
        )),
    }
}
