//! IRC capacity: Immigration Removal Centres send bed events and heartbeats to Postroom's IRC
//! ingress (`POST /irc_entry/{centre}/event` and `/heartbeat`, the ICD's own endpoints and
//! payloads, with a bearer token), faster than the real one-minute interval; a capacity
//! dashboard subscribes to the `irc` Room in pull mode and prints live occupancy per centre.
//! At the end each centre prints what it last reported and the dashboard what it last saw: the
//! two agree. It also shows the ingress's answers to a repeated event (201, no second event),
//! a body naming another centre (422), a post for a centre the client is not bound to (403)
//! and a schema violation (400 naming the field).
//!
//! Run: `cargo run -p postroom-examples --bin irc_capacity [CENTRES] [ROUNDS]` (default 3
//! centres, 20 rounds). The server runs in this process on a free loopback port, in memory,
//! with the `irc` pack applied. Each centre has its own application and client, bound to its
//! centre (a `publisher` right on the Room limited to the centre's ordering key, as
//! `postroom admin grants add APP publisher --room irc --key CENTRE` gives), so that no centre
//! can post for another; for brevity the dashboard uses the administrator's token, where a
//! deployment gives it a client with a `subscriber` right.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use broker_core::{Broker, Config, Principal, Role, RoomName, SystemClock};
use broker_server::ServerConfig;
use serde_json::{json, Value};

const CENTRES: [&str; 5] = [
    "brookhouse",
    "colnbrook",
    "harmondsworth",
    "tinsley",
    "yarlswood",
];
/// How often a centre sends: every 20 ms instead of every minute.
const INTERVAL: Duration = Duration::from_millis(20);

/// xorshift64*, seeded per centre, so runs repeat.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Bed counts, as a heartbeat reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    male_occupied: u64,
    female_occupied: u64,
    male_outofcommission: u64,
    female_outofcommission: u64,
}

impl Counts {
    fn from_heartbeat(v: &Value) -> Counts {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Counts {
            male_occupied: n("male_occupied"),
            female_occupied: n("female_occupied"),
            male_outofcommission: n("male_outofcommission"),
            female_outofcommission: n("female_outofcommission"),
        }
    }
    fn line(&self) -> String {
        format!(
            "occupied m={} f={} out_of_commission m={} f={}",
            self.male_occupied,
            self.female_occupied,
            self.male_outofcommission,
            self.female_outofcommission
        )
    }
}

/// One centre's client: its beds, and the ICD calls it makes.
struct Centre {
    name: &'static str,
    http: reqwest::Client,
    base: String,
    token: String,
    rng: Rng,
    /// People in the centre: (person id, gender).
    people: Vec<(u64, &'static str)>,
    /// Beds out of commission: (bed ref, gender).
    closed: Vec<(String, &'static str)>,
    beds_per_gender: u64,
    next_id: u64,
    events_sent: u64,
    clock: u64,
}

impl Centre {
    fn counts(&self) -> Counts {
        fn count<T>(list: &[(T, &str)], g: &str) -> u64 {
            list.iter().filter(|p| p.1 == g).count() as u64
        }
        Counts {
            male_occupied: count(&self.people, "m"),
            female_occupied: count(&self.people, "f"),
            male_outofcommission: count(&self.closed, "m"),
            female_outofcommission: count(&self.closed, "f"),
        }
    }

    /// A new timestamp each call, one second apart, so no two events share one.
    fn timestamp(&mut self) -> String {
        self.clock += 1;
        format!(
            "2024-05-01T{:02}:{:02}:{:02}Z",
            self.clock / 3600 % 24,
            self.clock / 60 % 60,
            self.clock % 60
        )
    }

    async fn post(&self, what: &str, body: &Value) -> Result<(u16, Value), reqwest::Error> {
        let r = self
            .http
            .post(format!("{}/irc_entry/{}/{what}", self.base, self.name))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// One random bed event that the centre's state allows.
    fn next_event(&mut self) -> Value {
        let ts = self.timestamp();
        let c = self.counts();
        let gender = if self.rng.below(2) == 0 { "m" } else { "f" };
        let (occ, closed) = if gender == "m" {
            (c.male_occupied, c.male_outofcommission)
        } else {
            (c.female_occupied, c.female_outofcommission)
        };
        let free = self.beds_per_gender.saturating_sub(occ + closed);
        match self.rng.below(10) {
            0..=4 if free > 0 => {
                self.next_id += 1;
                self.people.push((self.next_id, gender));
                json!({"operation": "check in", "timestamp": ts, "centre": self.name,
                       "person_id": self.next_id, "cid_id": 100_000 + self.next_id,
                       "gender": gender, "nationality": "xxx"})
            }
            5 if free > 0 => {
                let bed = format!("{}-{}", gender.to_uppercase(), self.rng.below(1000));
                self.closed.push((bed.clone(), gender));
                json!({"operation": "out commission", "timestamp": ts, "centre": self.name,
                       "bed_ref": bed, "reason": "Maintenance - Planned works", "gender": gender})
            }
            6 if !self.closed.is_empty() => {
                let (bed, _) = self.closed.remove(0);
                json!({"operation": "in commission", "timestamp": ts, "centre": self.name,
                       "bed_ref": bed})
            }
            _ if !self.people.is_empty() => {
                let i = self.rng.below(self.people.len() as u64) as usize;
                let (id, _) = self.people.remove(i);
                json!({"operation": "check out", "timestamp": ts, "centre": self.name,
                       "person_id": id})
            }
            _ => {
                self.next_id += 1;
                self.people.push((self.next_id, gender));
                json!({"operation": "check in", "timestamp": ts, "centre": self.name,
                       "person_id": self.next_id, "cid_id": 100_000 + self.next_id,
                       "gender": gender, "nationality": "gbr"})
            }
        }
    }

    fn heartbeat(&self) -> Value {
        let c = self.counts();
        json!({"centre": self.name,
               "male_occupied": c.male_occupied, "female_occupied": c.female_occupied,
               "male_outofcommission": c.male_outofcommission,
               "female_outofcommission": c.female_outofcommission,
               "male_total_configured": self.beds_per_gender,
               "female_total_configured": self.beds_per_gender})
    }

    /// `rounds` times: one to three events, then a heartbeat.
    async fn run(mut self, rounds: u32) -> Result<(), String> {
        let mut last = Value::Null;
        for _ in 0..rounds {
            for _ in 0..=self.rng.below(3) {
                let e = self.next_event();
                let (status, answer) = self.post("event", &e).await.map_err(|e| e.to_string())?;
                if status != 201 {
                    return Err(format!("{}: event answered {status}: {answer}", self.name));
                }
                self.events_sent += 1;
                last = e;
            }
            let (status, answer) = self
                .post("heartbeat", &self.heartbeat())
                .await
                .map_err(|e| e.to_string())?;
            if status != 201 {
                return Err(format!(
                    "{}: heartbeat answered {status}: {answer}",
                    self.name
                ));
            }
            tokio::time::sleep(INTERVAL).await;
        }
        println!(
            "sent {}: {} events={}",
            self.name,
            self.counts().line(),
            self.events_sent
        );
        if self.name == CENTRES[0] {
            // The ICD's own answers, once: a repeat, another centre's body, a bad field.
            let (status, answer) = self.post("event", &last).await.map_err(|e| e.to_string())?;
            println!("repeated event: {status} duplicate={}", answer["duplicate"]);
            let mut other = last.clone();
            other["centre"] = json!("elsewhere");
            let (status, answer) = self
                .post("event", &other)
                .await
                .map_err(|e| e.to_string())?;
            println!("other centre's body: {status} {}", answer["code"]);
            let r = self
                .http
                .post(format!("{}/irc_entry/elsewhere/event", self.base))
                .bearer_auth(&self.token)
                .json(&other)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            println!("posting for another centre: {} {}", r.status().as_u16(), {
                let v: Value = r.json().await.unwrap_or(Value::Null);
                v["code"].clone()
            });
            let mut bad = last;
            bad["timestamp"] = json!("yesterday");
            let (status, answer) = self.post("event", &bad).await.map_err(|e| e.to_string())?;
            println!("bad timestamp: {status} field={}", answer["field"]);
        }
        Ok(())
    }
}

/// An access token for a client, from the token endpoint.
async fn access_token(
    http: &reqwest::Client,
    base: &str,
    client_id: &str,
    secret: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let answer: Value = http
        .post(format!("{base}/oauth/token"))
        .basic_auth(client_id, Some(secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await?
        .json()
        .await?;
    Ok(answer["access_token"]
        .as_str()
        .ok_or("no access token")?
        .to_string())
}

/// The dashboard: pulls the Room's events and prints occupancy per centre after each heartbeat,
/// until every centre has sent `rounds` heartbeats.
async fn dashboard(
    http: reqwest::Client,
    base: String,
    token: String,
    sub: String,
    centres: usize,
    rounds: u32,
) -> Result<BTreeMap<String, (Counts, u64)>, String> {
    let mut state: BTreeMap<String, (Counts, u64)> = BTreeMap::new();
    let mut heartbeats: BTreeMap<String, u32> = BTreeMap::new();
    while heartbeats.len() < centres || heartbeats.values().any(|n| *n < rounds) {
        let answer: Value = http
            .post(format!("{base}/v1/subscriptions/{sub}/pull"))
            .bearer_auth(&token)
            .json(&json!({"max_messages": 100, "wait_ms": 1000}))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let messages = answer["messages"].as_array().cloned().unwrap_or_default();
        let mut ack_ids = Vec::new();
        for m in &messages {
            let payload = &m["payload"];
            let centre = payload["centre"].as_str().unwrap_or("?").to_string();
            let entry = state.entry(centre.clone()).or_default();
            if m["event"]["event_type"] == "heartbeat" {
                entry.0 = Counts::from_heartbeat(payload);
                *heartbeats.entry(centre.clone()).or_default() += 1;
                println!("live {centre}: {}", entry.0.line());
            } else {
                entry.1 += 1;
            }
            ack_ids.push(m["ack_id"].clone());
        }
        if !ack_ids.is_empty() {
            http.post(format!("{base}/v1/subscriptions/{sub}/ack"))
                .bearer_auth(&token)
                .json(&json!({"ack_ids": ack_ids}))
                .send()
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(state)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let centres: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let rounds: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let centres = centres.clamp(1, CENTRES.len());

    // The server, in this process: the administrator is created from the config, the `irc`
    // pack is applied, and the router serves on a free loopback port.
    let mut config = ServerConfig::default();
    let secret = "irc-capacity-demo-secret";
    config.auth.admin_client_id = Some("admin".into());
    config.auth.admin_client_secret = Some(secret.into());
    let broker = Broker::open_in_memory(Config::default(), Arc::new(SystemClock)).await?;
    broker_server::auth::bootstrap(&broker, &config.auth).await?;
    let pack = broker_server::pack::Pack::load(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/irc/pack.toml").as_ref(),
    )?;
    broker_server::pack::apply(
        &broker,
        &pack,
        &Principal::new("local/ADMIN/postroom/admin")?,
    )
    .await?;
    let app = broker_server::router(broker.clone(), &config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let http = reqwest::Client::new();
    let token = access_token(&http, &base, "admin", secret).await?;

    // The dashboard subscribes before the centres start, so it sees everything.
    let sub: Value = http
        .post(format!("{base}/v1/rooms/irc/subscriptions"))
        .bearer_auth(&token)
        .json(&json!({"mode": "pull"}))
        .send()
        .await?
        .json()
        .await?;
    let sub = sub["subscription"]["id"]
        .as_str()
        .or(sub["id"].as_str())
        .ok_or("no subscription id")?
        .to_string();
    let board = tokio::spawn(dashboard(
        http.clone(),
        base.clone(),
        token.clone(),
        sub,
        centres,
        rounds,
    ));

    // Each centre's client, bound to its centre.
    broker.create_member("UK/GOV/HO", "Home Office").await?;
    let mut senders = Vec::new();
    for (i, name) in CENTRES.iter().copied().take(centres).enumerate() {
        let app = broker
            .create_application("UK/GOV/HO", name, &format!("{name} IRC client"))
            .await?;
        let client_secret = format!("{name}-demo-secret-0123456789");
        broker
            .create_client(&app.id, Some(name.to_string()), Some(client_secret.clone()))
            .await?;
        broker
            .grant_limited(
                &app.id,
                Role::Publisher,
                Some(RoomName::new("irc")?),
                None,
                Some(vec![name.to_string()]),
            )
            .await?;
        let centre = Centre {
            name,
            http: http.clone(),
            base: base.clone(),
            token: access_token(&http, &base, name, &client_secret).await?,
            rng: Rng(0x1C0 + i as u64),
            people: Vec::new(),
            closed: Vec::new(),
            beds_per_gender: 40,
            next_id: (i as u64 + 1) * 10_000,
            events_sent: 0,
            clock: 0,
        };
        senders.push(tokio::spawn(centre.run(rounds)));
    }
    for s in senders {
        s.await??;
    }
    let seen = tokio::time::timeout(Duration::from_secs(60), board).await???;
    for (centre, (counts, events)) in &seen {
        println!("dashboard {centre}: {} events={events}", counts.line());
    }
    broker.close().await;
    Ok(())
}
