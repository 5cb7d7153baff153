//! The control port: a RESP server that valkey-cli and client libraries talk to. This build answers
//! PING (and ECHO, QUIT); the control issue adds CONFIG and INFO. It is started only once the probes
//! are attached and pre-existing connections are known, so `PING` → `PONG` means "auditing".

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use redis_protocol::codec::Resp2;
use redis_protocol::resp2::types::BytesFrame;
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

/// Most simultaneous control clients; more are refused so a misbehaving script cannot exhaust us.
const MAX_CLIENTS: usize = 64;

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the control port {addr}"))
}

pub async fn serve(listener: TcpListener) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        tokio::spawn(async move {
            let mut framed = Framed::new(stream, Resp2::default());
            while let Some(Ok(frame)) = framed.next().await {
                let (reply, quit) = answer(&frame);
                if framed.send(reply).await.is_err() || quit {
                    break;
                }
            }
            drop(permit);
        });
    }
}

fn error(msg: &str) -> BytesFrame {
    BytesFrame::Error(msg.to_string().into())
}

fn answer(frame: &BytesFrame) -> (BytesFrame, bool) {
    let args: Vec<Bytes> = match frame {
        BytesFrame::Array(items) => items
            .iter()
            .filter_map(|f| match f {
                BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => Some(b.clone()),
                _ => None,
            })
            .collect(),
        _ => {
            return (
                error("ERR Protocol error: expected an array of bulk strings"),
                true,
            );
        }
    };
    let Some(name) = args.first() else {
        return (error("ERR empty command"), false);
    };
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    match (name.as_str(), args.len()) {
        ("ping", 1) => (BytesFrame::SimpleString(Bytes::from_static(b"PONG")), false),
        ("ping", 2) => (BytesFrame::BulkString(args[1].clone()), false),
        ("echo", 2) => (BytesFrame::BulkString(args[1].clone()), false),
        ("quit", _) => (BytesFrame::SimpleString(Bytes::from_static(b"OK")), true),
        ("ping" | "echo", _) => (
            error(&format!(
                "ERR wrong number of arguments for '{name}' command"
            )),
            false,
        ),
        _ => {
            let shown = String::from_utf8_lossy(&args[0])
                .chars()
                .take(128)
                .collect::<String>();
            (
                error(&format!(
                    "ERR unknown command '{shown}', with args beginning with: "
                )),
                false,
            )
        }
    }
}
