//! GovStack subscriptions (list, add, read, change, delete) and pulling with confirmation
//! (`pull/v1`). Split from `govstack.rs`, which keeps the routes, the error mapping, the caller
//! and the event-type and publishing endpoints.

use super::*;

#[derive(Deserialize, Default)]
struct Options {
    #[serde(rename = "TTL")]
    ttl: Option<u64>,
    #[serde(rename = "FIFO")]
    fifo: Option<bool>,
}

#[derive(Deserialize, Default)]
struct SubBody {
    #[serde(rename = "eventType")]
    event_type: Option<String>,
    delivery: Option<String>,
    #[serde(default)]
    options: Options,
    /// Extension: where a PUSH subscription's events are POSTed.
    #[serde(rename = "pushUrl")]
    push_url: Option<String>,
    // `id` and `subscriberId` are the broker's to set; they are accepted and ignored.
}

/// TTL in seconds as the retry policy's time to live.
fn ttl_ms(ttl: u64) -> Result<u64, ApiError> {
    if ttl == 0 {
        return Err(ApiError::param("options.TTL", "must be at least 1 second"));
    }
    ttl.checked_mul(1000)
        .ok_or_else(|| ApiError::param("options.TTL", "too large"))
}

fn sub_item(sub: &Subscription, event_type: &str) -> Value {
    let (delivery, push_url) = match &sub.mode {
        DeliveryMode::Push(p) => ("PUSH", Some(broker_core::redact_url(&p.url))),
        DeliveryMode::Pull => ("PULL", None),
    };
    json!({
        "id": sub.id, "subscriberId": member_id(&sub.subscriber), "eventType": event_type,
        "delivery": delivery,
        "options": {"TTL": sub.retry_effective.ttl_ms / 1000, "FIFO": sub.ordered},
        "pushUrl": push_url, "status": sub.status.as_str(), "backlog": sub.backlog,
        "deadLetters": sub.dead_letters,
    })
}

/// The caller's subscription to exactly this event type, if any.
fn find_sub(
    s: &AppState,
    room: &RoomName,
    caller: &Principal,
    ty: &EventTypeName,
) -> Result<Option<Subscription>, ApiError> {
    Ok(s.broker.subscriptions(room)?.into_iter().find(|sub| {
        &sub.subscriber == caller && sub.event_types.as_deref() == Some(std::slice::from_ref(ty))
    }))
}

fn sub_missing(ty: &str) -> ApiError {
    ApiError::Core(broker_core::Error::SubscriptionNotFound {
        id: format!("(your subscription to {ty})"),
    })
}

pub(super) async fn list_subs(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<RoomPath>,
) -> GovResult {
    let room = room_name(&p.app)?;
    caller.require(
        caller.rights.any_on(&room),
        "use subscriptions of this Room",
    )?;
    let subs = s.broker.subscriptions(&room)?;
    let items: Vec<Value> = subs
        .iter()
        .filter(|sub| sub.subscriber == caller.principal)
        .filter_map(|sub| match sub.event_types.as_deref() {
            Some([t]) => Some(sub_item(sub, t.as_str())),
            _ => None,
        })
        .collect();
    Ok(json_reply(StatusCode::OK, json!(items)))
}

pub(super) async fn add_sub(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<TypePath>,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> GovResult {
    let room = room_name(&p.app)?;
    let ty = type_name(&p.event_type)?;
    caller.require(
        caller
            .rights
            .can_subscribe(&room, Some(std::slice::from_ref(&ty))),
        "subscribe to this event type",
    )?;
    let b: SubBody = super::super::optional_json(&headers, &raw)?;
    if b.event_type.as_deref().is_some_and(|t| t != p.event_type) {
        return Err(ApiError::param("eventType", "differs from the path").into());
    }
    // Subscribing needs the event type to exist in the Room.
    s.broker.event_type(&room, &ty).map_err(|e| match e {
        broker_core::Error::RoomNotFound { .. } | broker_core::Error::EventTypeNotFound { .. } => {
            ApiError::param("eventType", e.to_string())
        }
        e => ApiError::Core(e),
    })?;
    if find_sub(&s, &room, &caller.principal, &ty)?.is_some() {
        return Err(
            ApiError::Exists(format!("you are already subscribed to `{ty}` in `{room}`")).into(),
        );
    }
    let mode = match (b.delivery.as_deref().unwrap_or("PUSH"), b.push_url) {
        ("PUSH", Some(url)) => DeliveryMode::Push(PushEndpoint {
            url,
            headers: Vec::new(),
            basic_auth: None,
        }),
        ("PUSH", None) => return Err(ApiError::param(
            "pushUrl",
            "a PUSH subscription needs the extension field `pushUrl` (the yaml has no URL field)",
        )
        .into()),
        ("PULL", None) => DeliveryMode::Pull,
        ("PULL", Some(_)) => {
            return Err(ApiError::param("pushUrl", "a PULL subscription takes no push URL").into())
        }
        (other, _) => {
            return Err(
                ApiError::param("delivery", format!("`{other}` is not PUSH or PULL")).into(),
            )
        }
    };
    let mut new = NewSubscription::new(caller.principal, mode);
    new.event_types = Some(vec![ty.clone()]);
    new.ordered = Some(b.options.fifo.unwrap_or(false));
    new.retry = RetryOverrides {
        ttl_ms: Some(ttl_ms(b.options.ttl.unwrap_or(3600))?),
        ..RetryOverrides::default()
    };
    let created = s.broker.create_subscription(&room, new).await?;
    let mut item = sub_item(&created.subscription, ty.as_str());
    if let Some(secret) = created.secret {
        // Shown once: the Standard Webhooks key that signs every push.
        item["secret"] = json!(secret);
    }
    Ok(json_reply(StatusCode::OK, item))
}

pub(super) async fn read_sub(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<TypePath>,
) -> GovResult {
    let room = room_name(&p.app)?;
    let ty = type_name(&p.event_type)?;
    caller.require(
        caller.rights.any_on(&room),
        "use subscriptions of this Room",
    )?;
    let sub =
        find_sub(&s, &room, &caller.principal, &ty)?.ok_or_else(|| sub_missing(&p.event_type))?;
    Ok(json_reply(StatusCode::OK, sub_item(&sub, ty.as_str())))
}

pub(super) async fn patch_sub(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<TypePath>,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> GovResult {
    let room = room_name(&p.app)?;
    let ty = type_name(&p.event_type)?;
    // Changing a subscription is a use of it: its subscriber's right is checked again (a
    // manager may change any).
    caller.require(
        caller.rights.manages(&room)
            || caller
                .rights
                .can_subscribe(&room, Some(std::slice::from_ref(&ty))),
        "change a subscription to this event type",
    )?;
    let b: SubBody = body(&headers, &raw)?;
    let sub =
        find_sub(&s, &room, &caller.principal, &ty)?.ok_or_else(|| sub_missing(&p.event_type))?;
    if b.event_type.as_deref().is_some_and(|t| t != p.event_type) {
        return Err(ApiError::param("eventType", "differs from the path").into());
    }
    let is_push = matches!(sub.mode, DeliveryMode::Push(_));
    match b.delivery.as_deref() {
        None => {}
        Some("PUSH") if is_push => {}
        Some("PULL") if !is_push => {}
        Some("PUSH" | "PULL") => {
            return Err(ApiError::param(
                "delivery",
                "a subscription cannot change between PUSH and PULL; delete it and subscribe again",
            )
            .into())
        }
        Some(other) => {
            return Err(
                ApiError::param("delivery", format!("`{other}` is not PUSH or PULL")).into(),
            )
        }
    }
    let mut patch = SubscriptionPatch {
        ordered: b.options.fifo,
        ..SubscriptionPatch::default()
    };
    if let Some(ttl) = b.options.ttl {
        patch.retry = Some(RetryOverrides {
            ttl_ms: Some(ttl_ms(ttl)?),
            ..sub.retry.clone()
        });
    }
    if let Some(url) = b.push_url {
        match &sub.mode {
            DeliveryMode::Push(current) => {
                patch.push = Some(PushEndpoint {
                    url,
                    ..current.clone()
                })
            }
            DeliveryMode::Pull => {
                return Err(
                    ApiError::param("pushUrl", "a PULL subscription takes no push URL").into(),
                )
            }
        }
    }
    let updated = s.broker.update_subscription(sub.id, patch).await?;
    // The yaml answers a successful update with 201.
    Ok(json_reply(
        StatusCode::CREATED,
        sub_item(&updated, ty.as_str()),
    ))
}

pub(super) async fn delete_sub(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<TypePath>,
) -> GovResult {
    let room = room_name(&p.app)?;
    let ty = type_name(&p.event_type)?;
    caller.require(
        caller.rights.any_on(&room),
        "use subscriptions of this Room",
    )?;
    let sub =
        find_sub(&s, &room, &caller.principal, &ty)?.ok_or_else(|| sub_missing(&p.event_type))?;
    s.broker.delete_subscription(sub.id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- Pull -----

/// The caller's PULL subscription to the type; the yaml's "invalid request" (409) when there is
/// none or it is a PUSH subscription.
fn pull_sub(s: &AppState, p: &TypePath, caller: &Caller) -> Result<Subscription, ApiError> {
    let room = room_name(&p.app)?;
    let ty = type_name(&p.event_type)?;
    caller.require(
        caller
            .rights
            .can_subscribe(&room, Some(std::slice::from_ref(&ty))),
        "receive this event type",
    )?;
    let caller = &caller.principal;
    let invalid = |why: &str| ApiError::NotSubscribed(why.to_string());
    match find_sub(s, &room, caller, &ty) {
        Ok(Some(sub)) if matches!(sub.mode, DeliveryMode::Pull) => Ok(sub),
        Ok(Some(_)) => Err(invalid(
            "your subscription to this event type is PUSH, not PULL",
        )),
        Ok(None) | Err(ApiError::Core(broker_core::Error::RoomNotFound { .. })) => {
            Err(invalid("you have no PULL subscription to this event type"))
        }
        Err(e) => Err(e),
    }
}

pub(super) async fn pull(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<TypePath>,
) -> GovResult {
    let sub = pull_sub(&s, &p, &caller)?;
    let mut msgs = s.broker.pull(sub.id, 1, None, 0).await?;
    match msgs.pop() {
        Some(m) => {
            let mut item = event_item(&m.event);
            item["attempt"] = json!(m.attempt);
            item["leaseUntil"] = json!(m.lease_until.to_rfc3339());
            Ok(json_reply(StatusCode::OK, item))
        }
        None => Err(ApiError::Core(broker_core::Error::EventNotFound {
            id: "(no event available)".into(),
        })
        .into()),
    }
}

pub(super) async fn confirm(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<EventPath>,
) -> GovResult {
    let tp = TypePath {
        app: p.app.clone(),
        event_type: p.event_type.clone(),
    };
    let sub = pull_sub(&s, &tp, &caller)?;
    let not_found = || {
        ApiError::Core(broker_core::Error::EventNotFound {
            id: p.event_id.clone(),
        })
    };
    let id = EventId::parse(&p.event_id).map_err(|_| not_found())?;
    match s.broker.ack_event(sub.id, id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e) => Err(e.into()),
    }
}
