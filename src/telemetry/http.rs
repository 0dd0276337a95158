//! The one HTTP/1.1 client the span exporter needs for OTLP/HTTP: a
//! kept-alive hyper connection to the collector and a protobuf POST on it.
//! Plain `http://` only (no TLS, no custom headers, no compression): it is
//! meant for a collector on the same host or network segment.

/// An HTTP/1.1 client connection to `url`'s host and port (its task runs
/// on the current runtime until the connection closes).
pub(crate) async fn http1_connect(
    url: &hyper::Uri,
) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>, String> {
    let host = url.host().ok_or("no host")?;
    let port = url.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// POSTs an OTLP protobuf `body` to `url` over `send`; an error for
/// anything but a 2xx.
pub(crate) async fn http1_post(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    url: &hyper::Uri,
    body: bytes::Bytes,
) -> Result<(), String> {
    use http_body_util::{BodyExt, Full};
    let host = url.host().ok_or("no host")?;
    let port = url.port_u16().unwrap_or(80);
    send.ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::post(url.path())
        .header("host", format!("{host}:{port}"))
        .header("content-type", "application/x-protobuf")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read the body off, so the connection can carry the next request.
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}
