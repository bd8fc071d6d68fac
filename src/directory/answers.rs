//! The bodies of `GET /v1/snapshot`, encoded once per published snapshot
//! and shared by every query that waits for it (README.md, "Directory
//! API"): with 1,000 sherlocks waiting, a change costs one serialization
//! (and one gzip) per view, not one per subscriber.
//!
//! A published snapshot carries its own cache of answers, keyed by
//! [`Answer`]: which clients' overrides the body holds ([`View`]) and how
//! it is encoded ([`Encoding`]). The cache lives as long as the snapshot
//! is the one in force, so it needs no eviction; a later kind of answer
//! (a delta from an older index) is one more key.

use std::collections::HashMap;
use std::io::Write as _;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::model::{ClientName, Snapshot};

/// How an answer's body is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Plain JSON: what every sherlock that does not ask for more gets,
    /// byte for byte what directories before the cache sent.
    Identity,
    /// `Content-Encoding: gzip`, for a client whose `Accept-Encoding`
    /// names gzip (sherlock's does): about 10 times fewer bytes.
    Gzip,
}

impl Encoding {
    /// The encoding an `Accept-Encoding` header asks for: gzip when it is
    /// listed without `q=0`, else plain JSON (RFC 9110 12.5.3; `*` is not
    /// taken as gzip, so a client must name what it can decode).
    pub fn accepted(header: Option<&[u8]>) -> Encoding {
        let Some(text) = header.and_then(|h| std::str::from_utf8(h).ok()) else { return Encoding::Identity };
        let gzip = text.split(',').any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .or_else(|| p.strip_prefix("Q="))
                    .is_some_and(|q| q.trim().parse::<f32>() == Ok(0.0))
            });
            (coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip")) && !refused
        });
        if gzip {
            Encoding::Gzip
        } else {
            Encoding::Identity
        }
    }

    /// The `Content-Encoding` header's value, if any.
    pub fn header(self) -> Option<&'static str> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip => Some("gzip"),
        }
    }
}

/// Which per-client overrides an answer carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum View {
    /// Every client's: what a query that names no client gets (`dw`,
    /// older sherlocks, operators).
    All,
    /// One client's overrides only (None: a client that has none), so no
    /// sherlock learns another client's routes. The services stay the
    /// defaults: sherlock applies its own overrides (`Snapshot::for_client`),
    /// which gives the same result on this view as on the whole snapshot.
    Client(Option<ClientName>),
}

/// One kind of answer to a snapshot query.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Answer {
    pub view: View,
    pub encoding: Encoding,
}

/// A snapshot as published, with the answers encoded from it so far.
#[derive(Debug)]
pub struct Published {
    pub snapshot: Arc<Snapshot>,
    /// Each answer made at most once: the first query to need it encodes
    /// it, the others that arrive meanwhile wait for the same bytes.
    answers: Mutex<HashMap<Answer, Arc<OnceCell<Bytes>>>>,
}

impl Deref for Published {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl Published {
    pub fn new(snapshot: Snapshot) -> Published {
        Published { snapshot: Arc::new(snapshot), answers: Mutex::new(HashMap::new()) }
    }

    /// The view a query gets: `client` is the client it names (checked
    /// against its token), or None for every client's overrides. Clients
    /// without overrides share one view.
    pub fn view_for(&self, client: Option<&ClientName>) -> View {
        match client {
            None => View::All,
            Some(c) => View::Client(self.snapshot.clients.contains_key(c).then(|| c.clone())),
        }
    }

    /// The snapshot as `view` shows it.
    pub fn viewed(&self, view: &View) -> Snapshot {
        let mut shown = (*self.snapshot).clone();
        if let View::Client(client) = view {
            shown.clients.retain(|name, _| Some(name) == client.as_ref());
        }
        shown
    }

    /// The body of `answer`, encoded now if no query has needed it yet.
    /// Encoding runs on the blocking pool: a 10,000-instance snapshot takes
    /// milliseconds to serialize and gzip, and the async workers keep
    /// answering meanwhile.
    pub async fn body(self: &Arc<Self>, answer: Answer) -> Bytes {
        let cell = self.answers.lock().unwrap().entry(answer.clone()).or_default().clone();
        cell.get_or_init(|| async {
            match answer.encoding {
                Encoding::Identity => {
                    let this = self.clone();
                    let view = answer.view.clone();
                    blocking(move || this.encode_json(&view)).await
                }
                Encoding::Gzip => {
                    let plain = Box::pin(self.body(Answer { encoding: Encoding::Identity, ..answer.clone() })).await;
                    blocking(move || gzip(&plain)).await
                }
            }
        })
        .await
        .clone()
    }

    fn encode_json(&self, view: &View) -> Bytes {
        let json = match view {
            View::All => serde_json::to_vec(&*self.snapshot),
            view => serde_json::to_vec(&self.viewed(view)),
        };
        Bytes::from(json.expect("a snapshot always serializes: its maps have string keys"))
    }

    /// How many answers have been encoded (for tests).
    pub fn encoded(&self) -> usize {
        self.answers.lock().unwrap().values().filter(|c| c.initialized()).count()
    }
}

/// Runs `f` on the blocking pool (or here, if the runtime is going away).
async fn blocking(f: impl FnOnce() -> Bytes + Send + 'static) -> Bytes {
    tokio::task::spawn_blocking(f).await.expect("encoding a snapshot does not panic")
}

/// gzip at the default level: once per index, so the smaller body is worth
/// the milliseconds (level 1 makes it a third larger).
fn gzip(plain: &[u8]) -> Bytes {
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(plain.len() / 8), flate2::Compression::default());
    encoder.write_all(plain).expect("writing to a Vec cannot fail");
    Bytes::from(encoder.finish().expect("writing to a Vec cannot fail"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read as _;

    use super::*;
    use crate::model::ServiceBackends;

    fn snapshot() -> Snapshot {
        let mut s = Snapshot { epoch: 7, index: 3, ..Snapshot::default() };
        s.services.insert("emitter".parse().unwrap(), ServiceBackends::default());
        for c in ["alpha", "beta"] {
            let overrides: BTreeMap<_, _> = [("emitter".parse().unwrap(), ServiceBackends::default())].into();
            s.clients.insert(c.parse().unwrap(), overrides);
        }
        s
    }

    #[test]
    fn accept_encoding() {
        for (header, expected) in [
            (None, Encoding::Identity),
            (Some("gzip"), Encoding::Gzip),
            (Some("br, GZIP;q=0.5"), Encoding::Gzip),
            (Some("deflate, gzip ; q=1.0"), Encoding::Gzip),
            (Some("gzip;q=0"), Encoding::Identity),
            (Some("gzip; q=0.0"), Encoding::Identity),
            (Some("*"), Encoding::Identity),
            (Some("identity"), Encoding::Identity),
            (Some("gzipx"), Encoding::Identity),
        ] {
            assert_eq!(Encoding::accepted(header.map(str::as_bytes)), expected, "{header:?}");
        }
    }

    #[tokio::test]
    async fn each_answer_is_encoded_once_and_views_hold_one_client() {
        let published = Arc::new(Published::new(snapshot()));
        let all = Answer { view: View::All, encoding: Encoding::Identity };
        // Many queries at once: one encoding, the same bytes shared.
        let queries: Vec<_> = (0..50)
            .map(|_| {
                let (published, all) = (published.clone(), all.clone());
                tokio::spawn(async move { published.body(all).await })
            })
            .collect();
        let mut bodies = Vec::new();
        for q in queries {
            bodies.push(q.await.unwrap());
        }
        // Byte for byte what serializing the snapshot gave before the cache.
        assert_eq!(bodies[0], serde_json::to_vec(&snapshot()).unwrap());
        assert!(bodies.iter().all(|b| b.as_ptr() == bodies[0].as_ptr()), "the same allocation, not copies");
        assert_eq!(published.encoded(), 1);

        let alpha = published.view_for(Some(&"alpha".parse().unwrap()));
        let body = published.body(Answer { view: alpha, encoding: Encoding::Gzip }).await;
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut json).unwrap();
        let seen = Snapshot::from_json(&json).unwrap();
        assert_eq!(seen.clients.keys().map(|c| c.as_str()).collect::<Vec<_>>(), ["alpha"]);
        assert_eq!(seen.services, snapshot().services, "the defaults stay; sherlock applies its overrides");
        assert_eq!(published.encoded(), 3, "the view's JSON, then its gzip");

        // Clients without overrides share one view, which holds none.
        let (x, y) = (published.view_for(Some(&"x".parse().unwrap())), published.view_for(Some(&"y".parse().unwrap())));
        assert_eq!(x, y);
        assert!(published.viewed(&x).clients.is_empty());
    }
}
