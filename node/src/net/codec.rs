//! The request-response codec of the control protocol: CBOR through `flare_protocols::codec`,
//! with explicit size caps on both sides. An oversized message is refused with an error that
//! says so, instead of being truncated into a confusing decode failure.

use std::io;
use std::marker::PhantomData;

use flare_protocols::codec::{decode, encode};
use futures::prelude::*;
use libp2p::StreamProtocol;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// CBOR codec with separate request and response caps.
#[derive(Debug)]
pub struct CborCodec<Req, Resp> {
    max_request: usize,
    max_response: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for CborCodec<Req, Resp> {
    fn clone(&self) -> Self {
        CborCodec {
            max_request: self.max_request,
            max_response: self.max_response,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> CborCodec<Req, Resp> {
    /// A codec that refuses requests over `max_request` and responses over `max_response`.
    pub fn new(max_request: usize, max_response: usize) -> Self {
        CborCodec {
            max_request,
            max_response,
            _types: PhantomData,
        }
    }
}

async fn read_capped<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message exceeds the limit of {max} bytes"),
        ));
    }
    Ok(buf)
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl<Req, Resp> libp2p::request_response::Codec for CborCodec<Req, Resp>
where
    Req: Send + Serialize + DeserializeOwned,
    Resp: Send + Serialize + DeserializeOwned,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        let buf = read_capped(io, self.max_request).await?;
        decode(&buf, self.max_request).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        let buf = read_capped(io, self.max_response).await?;
        decode(&buf, self.max_response).map_err(invalid)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode(&req, self.max_request).map_err(invalid)?;
        io.write_all(&bytes).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode(&resp, self.max_response).map_err(invalid)?;
        io.write_all(&bytes).await?;
        io.close().await
    }
}
