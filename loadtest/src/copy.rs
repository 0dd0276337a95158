//! `smtp-load copy`: a plain TCP relay on one current-thread tokio runtime,
//! each accepted connection copied both ways to one target with
//! `tokio::io::copy_bidirectional` and nothing parsed. It is the floor of a
//! proxy built on tokio, for `loadtest/scenarios/cores.sh` to set beside
//! HAProxy `mode tcp` and smtp-edge: what the runtime costs per message
//! before any SMTP work (loadtest/RESULTS.md section 24).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// Relays every connection accepted on `listener` to `target` until the
/// process is stopped. A connection the target refuses is closed.
pub async fn copy(listener: TcpListener, target: SocketAddr) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            // Out of descriptors, say: not a busy loop meanwhile.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}
