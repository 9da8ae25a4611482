//! One chunk, now: for a reader (a lazily deployed guest's filesystem)
//! that cannot wait for a whole fetch to reach the chunk it needs.

use std::time::Duration;

use iroh::endpoint::Connection;

use xenod_store::{ChunkId, decode};

use super::PeerError;
use super::protocol::{Answer, Request, WireError, read_answer};

const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Asks the provider at the other end of `conn` (on [`super::ALPN`]) for
/// chunk `id`: its plaintext, verified against the id; `None` if the
/// provider does not have it. Nothing is stored.
pub async fn fetch_one(conn: &Connection, id: ChunkId) -> Result<Option<Vec<u8>>, PeerError> {
    let peer = conn.remote_id().to_string();
    let cerr = |e: &dyn std::fmt::Display| PeerError::Connection { peer: peer.clone(), why: e.to_string() };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| cerr(&e))?;
    send.write_all(&Request::Chunks(vec![id]).encode()).await.map_err(|e| cerr(&e))?;
    send.finish().map_err(|e| cerr(&e))?;
    let frame = match tokio::time::timeout(READ_TIMEOUT, read_answer(&mut recv)).await {
        Err(_) => return Err(cerr(&"no answer within the read timeout")),
        Ok(Err(WireError::Io(e))) => return Err(cerr(&e)),
        Ok(Err(e)) => return Err(PeerError::Protocol { peer, why: e.to_string() }),
        Ok(Ok(Answer::Absent)) => return Ok(None),
        Ok(Ok(Answer::One(f))) => f,
        Ok(Ok(Answer::Solid { .. })) => {
            return Err(PeerError::Protocol { peer, why: "solid frame in answer to a single-frame request".into() });
        }
    };
    decode(&id, frame.encoding, &frame.stored, frame.plain_len as usize).map(Some).map_err(|e| PeerError::BadChunk {
        peer,
        id,
        why: e.to_string(),
    })
}
