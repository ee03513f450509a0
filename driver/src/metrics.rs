//! A minimal Prometheus endpoint: every request gets the current text exposition.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves `render()` on every connection until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((mut conn, _)) = accepted else { continue };
                let render = render.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    // The request itself does not matter; read its head and answer.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await;
                    let body = render();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(body.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        }
    }
}
