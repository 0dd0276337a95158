//! Smoke test: the proxy greets and answers EHLO over a plain listener.
mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greets_and_answers_ehlo() {
    let proxy = Proxy::start(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\nmaildir = \"{DIR}/mail\"\n",
    )
    .await;
    let mut c = Raw::greeted(proxy.addr).await;
    let r = c.cmd("EHLO client.example").await;
    assert_eq!(r.code, 250);
    assert!(r.text.contains("PIPELINING"), "{r:?}");
    assert!(!r.text.contains("STARTTLS"), "{r:?}");
    let r = c.cmd("QUIT").await;
    assert_eq!(r.code, 221);
    proxy.stop().await;
}
