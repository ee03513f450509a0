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

/// One exposition made of several (each image's store, each volume's filesystem): every
/// metric family once, its `# HELP` and `# TYPE` lines first and all its samples after
/// them, in the order families first appear. Prometheus refuses a scrape in which a
/// family's header comes twice or its samples are split.
pub fn merge(parts: impl IntoIterator<Item = String>) -> String {
    #[derive(Default)]
    struct Family {
        help: Option<String>,
        kind: Option<String>,
        samples: Vec<String>,
    }
    let header = |line: &str, prefix: &str| {
        line.strip_prefix(prefix)
            .and_then(|rest| rest.split(' ').next())
            .map(str::to_owned)
    };
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, Family> = Default::default();
    for part in parts {
        // Samples belong to the family of the `# HELP`/`# TYPE` before them when they are
        // named for it (a histogram's `_bucket`, `_sum` and `_count` too); any other sample
        // is a family of its own name.
        let mut current: Option<String> = None;
        for line in part.lines().filter(|l| !l.trim().is_empty()) {
            let (name, what) = if let Some(n) = header(line, "# HELP ") {
                (n, 0)
            } else if let Some(n) = header(line, "# TYPE ") {
                (n, 1)
            } else if line.starts_with('#') {
                continue;
            } else {
                let metric = line.split(['{', ' ']).next().unwrap_or_default();
                let of_current = current.as_deref().is_some_and(|c| {
                    metric
                        .strip_prefix(c)
                        .is_some_and(|rest| ["", "_bucket", "_sum", "_count"].contains(&rest))
                });
                match &current {
                    Some(c) if of_current => (c.clone(), 2),
                    _ => (metric.to_owned(), 2),
                }
            };
            if what < 2 {
                current = Some(name.clone());
            }
            let f = families.entry(name.clone()).or_insert_with(|| {
                order.push(name);
                Family::default()
            });
            let line = line.to_owned();
            match what {
                0 => {
                    f.help.get_or_insert(line);
                }
                1 => {
                    f.kind.get_or_insert(line);
                }
                _ => f.samples.push(line),
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let Some(f) = families.remove(&name) else {
            continue;
        };
        for line in f.help.iter().chain(&f.kind).chain(&f.samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn families_of_several_parts_come_once_each_with_all_their_samples() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{i=\"a\"} 1\n\
                 # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\",i=\"a\"} 2\nh_sum{i=\"a\"} 3\nh_count{i=\"a\"} 2\n\
                 bare{i=\"a\"} 5\n";
        let b = "# HELP x_total X.\n# TYPE x_total counter\nx_total{i=\"b\"} 4\n\
                 # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\",i=\"b\"} 1\nh_sum{i=\"b\"} 1\nh_count{i=\"b\"} 1\n\
                 bare{i=\"b\"} 6\n";
        let got = merge([a.to_owned(), b.to_owned()]);
        let want = "# HELP x_total X.\n# TYPE x_total counter\nx_total{i=\"a\"} 1\nx_total{i=\"b\"} 4\n\
                    # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\",i=\"a\"} 2\nh_sum{i=\"a\"} 3\nh_count{i=\"a\"} 2\n\
                    h_bucket{le=\"1\",i=\"b\"} 1\nh_sum{i=\"b\"} 1\nh_count{i=\"b\"} 1\n\
                    bare{i=\"a\"} 5\nbare{i=\"b\"} 6\n";
        assert_eq!(got, want);
        assert_eq!(merge([String::new()]), "");
    }
}
