//! Integration tests of jarvis-auth: one binary, real servers on 127.0.0.1:0.

mod inbound;
mod outbound;
mod support;
