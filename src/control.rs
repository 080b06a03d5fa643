//! The control API: a Unix socket (mode 0600) speaking length-delimited
//! prost frames (`ControlRequest` in, `ControlReply` frames out, the last
//! with `done`). One request per connection.

use crate::daemon::{self, Node};
use crate::views;
use bytes::BytesMut;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tandem_proto::pb::{self, envelope::Msg};
use tandem_proto::{FrameDecoder, NodeId, RgId, encode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

/// Requests are small; anything bigger is not a request.
const MAX_REQUEST: usize = 64 * 1024;
/// Sessions per reply frame while streaming an export.
const EXPORT_CHUNK: usize = 512;

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, node: Arc<Node>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(s, node).await {
                        warn!(error = %e, "control connection");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "control socket accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn write_reply(
    s: &mut UnixStream,
    json: String,
    error: String,
    done: bool,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    encode_frame(
        &pb::Envelope {
            msg: Some(Msg::ControlReply(pb::ControlReply { json, error, done })),
        },
        &mut out,
    );
    s.write_all(&out).await
}

async fn read_request(s: &mut UnixStream) -> Result<pb::ControlRequest, String> {
    let mut dec = FrameDecoder::new(MAX_REQUEST);
    let mut buf = vec![0u8; 4096];
    loop {
        match dec.next_frame() {
            Ok(Some(pb::Envelope {
                msg: Some(Msg::ControlRequest(r)),
            })) => return Ok(r),
            Ok(Some(_)) => return Err("not a control request".into()),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .map_err(|_| "request timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before a request".into());
        }
        dec.push(&buf[..n]);
    }
}

async fn handle(mut s: UnixStream, node: Arc<Node>) -> std::io::Result<()> {
    let req = match read_request(&mut s).await {
        Ok(r) => r,
        Err(e) => return write_reply(&mut s, String::new(), e, true).await,
    };
    use pb::control_request::Cmd;
    let result: Result<String, String> = match req.cmd {
        Some(Cmd::Status(_)) => Ok(views::status(&node).await.to_string()),
        Some(Cmd::Statistics(_)) => Ok(views::statistics(&node).to_string()),
        Some(Cmd::Interfaces(_)) => Ok(views::interfaces(&node).await.to_string()),
        Some(Cmd::Information(_)) => Ok(views::information(&node).await.to_string()),
        Some(Cmd::Failover(f)) => match (u16::try_from(f.rg), u8::try_from(f.node)) {
            (Ok(rg), Ok(n)) if n <= 1 => {
                node.cluster.failover(RgId(rg), NodeId(n)).await.map(|()| {
                    serde_json::json!({"rg": rg, "node": n, "result": "committed"}).to_string()
                })
            }
            _ => Err(format!(
                "redundancy group {} / node {} out of range",
                f.rg, f.node
            )),
        },
        Some(Cmd::Reset(r)) => match u16::try_from(r.rg) {
            Ok(rg) => node
                .cluster
                .reset(RgId(rg))
                .await
                .map(|()| serde_json::json!({"rg": rg, "result": "reset"}).to_string()),
            Err(_) => Err(format!("redundancy group {} out of range", r.rg)),
        },
        Some(Cmd::Sessions(q)) => return export_sessions(&mut s, &node, q).await,
        Some(Cmd::Dataplane(d)) => dataplane_command(&node, d.action()).await,
        Some(Cmd::SecurityLog(_)) => Ok(views::security_log(&node).to_string()),
        Some(Cmd::ClearSessions(q)) => clear_sessions(&node, &q).await,
        None => Err("empty request".into()),
    };
    match result {
        Ok(json) => write_reply(&mut s, json, String::new(), true).await,
        Err(e) => write_reply(&mut s, String::new(), e, true).await,
    }
}

/// `clear security flow session`: blocking table work off the runtime.
async fn clear_sessions(node: &Arc<Node>, q: &pb::SessionQuery) -> Result<String, String> {
    let filter = crate::sessions::SessionFilter::from_query(q)?;
    let n = node.clone();
    let out = tokio::task::spawn_blocking(move || {
        let roles = n.cluster.roles();
        crate::sessions::clear(&n.table, &n.deltas, &roles, &filter)
    })
    .await
    .map_err(|e| format!("clear: {e}"))?;
    tracing::info!(
        cleared = out.cleared,
        deletes_synced = out.deletes_synced,
        "sessions cleared by operator"
    );
    serde_json::to_string(&out).map_err(|e| e.to_string())
}

/// Stops, starts or restarts the dataplane (blocking work off the runtime).
async fn dataplane_command(
    node: &Arc<Node>,
    action: pb::dataplane_command::Action,
) -> Result<String, String> {
    use pb::dataplane_command::Action;
    let n = node.clone();
    let run = move || -> Result<&'static str, String> {
        match action {
            Action::Stop => {
                if daemon::stop_dataplane(&n, "by operator") {
                    Ok("stopped")
                } else {
                    Err("the dataplane is not running".into())
                }
            }
            Action::Start => daemon::start_dataplane(&n).map(|()| "started"),
            Action::Restart => {
                daemon::stop_dataplane(&n, "restarting by operator");
                daemon::start_dataplane(&n).map(|()| "restarted")
            }
            Action::Unspecified => Err("no dataplane action".into()),
        }
    };
    let result = tokio::task::spawn_blocking(run)
        .await
        .map_err(|e| e.to_string())??;
    Ok(serde_json::json!({"dataplane": result}).to_string())
}

/// Streams the sessions of one RG (or all) as JSON lines, in chunks taken
/// under the table lock, so a million sessions never sit in memory at once.
/// The trailer says whether the RG's epoch stayed the same throughout (a
/// snapshot consistent with one owner).
async fn export_sessions(
    s: &mut UnixStream,
    node: &Node,
    q: pb::SessionQuery,
) -> std::io::Result<()> {
    if q.peer_diff {
        return write_reply(s, String::new(), "--peer-diff needs both nodes' sockets: use `tandem show security flow session --peer-diff --peer-socket PATH`".into(), true).await;
    }
    let filter = match crate::sessions::SessionFilter::from_query(&q) {
        Ok(f) => f,
        Err(e) => return write_reply(s, String::new(), e, true).await,
    };
    if q.summary {
        let v = crate::sessions::summary(&tandem_dataplane::session::read(&node.table), &filter);
        return write_reply(s, v.to_string(), String::new(), true).await;
    }
    let rgs: Vec<RgId> = filter.rgs(&tandem_dataplane::session::read(&node.table));
    let mut total = 0u64;
    for rg in rgs {
        let epoch_before = node.cluster.roles().get(&rg).map(|r| r.epoch.0);
        let mut cursor = tandem_dataplane::session::read(&node.table).begin_export(rg);
        loop {
            let (lines, more) = {
                // Shared access: listing sessions never stalls forwarding.
                let t = tandem_dataplane::session::read(&node.table);
                let now = (node.clock)();
                let mut out = Vec::with_capacity(EXPORT_CHUNK);
                let more = t.export_chunk(&mut cursor, EXPORT_CHUNK, now, &mut out, |r| {
                    filter.matches(r)
                });
                let lines: Vec<String> = out
                    .iter()
                    .map(|synced| {
                        let h = t.lookup_forward(&synced.key).and_then(|h| t.get(h));
                        views::session_json(synced, h.map(|r| t.origin(r)), &node.compiled)
                            .to_string()
                    })
                    .collect();
                (lines, more)
            };
            total += lines.len() as u64;
            if !lines.is_empty()
                && write_reply(s, lines.join("\n"), String::new(), false)
                    .await
                    .is_err()
            {
                return Ok(());
            }
            if !more {
                break;
            }
        }
        let epoch_after = node.cluster.roles().get(&rg).map(|r| r.epoch.0);
        let trailer = serde_json::json!({
            "end_of_rg": rg.0,
            "epoch": epoch_after,
            "consistent_epoch": epoch_before == epoch_after,
        });
        write_reply(s, trailer.to_string(), String::new(), false).await?;
    }
    write_reply(
        s,
        serde_json::json!({"sessions": total}).to_string(),
        String::new(),
        true,
    )
    .await
}

/// The CLI side: sends `req`, calls `on_reply` for each reply's JSON.
pub async fn request(
    path: &Path,
    req: pb::ControlRequest,
    mut on_reply: impl FnMut(&str),
) -> Result<(), String> {
    let mut s = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach the node at {}: {e} (is `tandem node` running?)",
            path.display()
        )
    })?;
    let mut out = BytesMut::new();
    encode_frame(
        &pb::Envelope {
            msg: Some(Msg::ControlRequest(req)),
        },
        &mut out,
    );
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut dec = FrameDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(env) = dec.next_frame().map_err(|e| format!("bad reply: {e}"))? {
            let Some(Msg::ControlReply(r)) = env.msg else {
                return Err("unexpected reply".into());
            };
            if !r.error.is_empty() {
                return Err(r.error);
            }
            if !r.json.is_empty() {
                on_reply(&r.json);
            }
            if r.done {
                return Ok(());
            }
        }
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the node closed the connection".into());
        }
        dec.push(&buf[..n]);
    }
}
