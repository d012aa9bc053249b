//! The attacker's tests (issue 14): each test is an attack on Postroom written as the attacker's
//! steps, by a hostile member application or an anonymous caller, against a broker with two
//! members (the Home Office and the Ministry of Justice), each with its own applications and
//! rights. Each test failed before its fix; together they are the threat model in code.
//!
//! The modules group the attacks by what they go after: `rooms` (rights that outlive a Room,
//! quota exhaustion), `revocation` (revoked rights and deleted applications), `audit` (filling
//! the disk through the audit log), `data_folder` (the database on disk and the signing key),
//! `tokens` (token lifetime, what minted a token, external issuers), `brakes` (the token
//! endpoint's cost: guessing secrets, floods of Argon2 checks),
//! `publish` (violation amplification, event ids, IRC centres), `secrets` (push secrets shown
//! back) and `transport` (slow headers, DNS answers in errors).
#![forbid(unsafe_code)]

mod harness;

// `Served`: the server on a real socket, for the transport attacks.
#[path = "../common/mod.rs"]
mod common;

mod audit;
mod brakes;
mod data_folder;
mod publish;
mod revocation;
mod rooms;
mod secrets;
mod tokens;
mod transport;
