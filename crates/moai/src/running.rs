//! Whether a moai answers on an address: the commands that change the database behind the
//! server's back (`restore`, `doc import`) refuse to run while it does, because the server holds
//! documents in memory and would not see the change (or would overwrite it).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// True when `host:port` answers `GET /health` as a moai does.
pub fn moai_answers(host: &str, port: u16) -> bool {
    let Ok(mut addrs) = (host, port).to_socket_addrs() else { return false };
    let Some(addr) = addrs.next() else { return false };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        // Something listens there; assume it may be moai.
        return true;
    }
    let mut response = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut response);
    String::from_utf8_lossy(&response).contains("\"service\":\"sync\"")
}
