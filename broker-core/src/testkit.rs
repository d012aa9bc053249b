//! Set-up shared by the core's unit tests: an approved Room with one event type that takes any
//! JSON object, so that each test starts from a place it can publish to.

use crate::broker::Broker;
use crate::{EventTypeName, EventTypeSpec, NewRoom, Principal, PublishRequest, RoomName};

/// An approved Room `r` of `admin`, with the event type `t` (schema `{"type": "object"}`).
pub(crate) struct TestRoom {
    pub room: RoomName,
    pub ty: EventTypeName,
    pub admin: Principal,
}

impl TestRoom {
    /// Makes the Room and its event type on `broker`.
    pub(crate) async fn create(broker: &Broker) -> TestRoom {
        let room = RoomName::new("r").expect("room");
        let admin = Principal::new("admin").expect("principal");
        broker
            .create_room(NewRoom::new(room.clone(), admin.clone()).approved())
            .await
            .expect("create room");
        let ty = EventTypeName::new("t").expect("type");
        broker
            .put_event_type(
                &room,
                EventTypeSpec {
                    name: ty.clone(),
                    description: String::new(),
                    schema: serde_json::json!({"type": "object"}),
                    key_pointer: None,
                },
            )
            .await
            .expect("event type");
        TestRoom { room, ty, admin }
    }

    /// A pull subscription of the Room's administrator, with per-key ordering or without.
    pub(crate) async fn pull_subscription(
        &self,
        broker: &Broker,
        ordered: bool,
    ) -> crate::SubscriptionId {
        let mut new = crate::NewSubscription::new(self.admin.clone(), crate::DeliveryMode::Pull);
        new.ordered = Some(ordered);
        broker
            .create_subscription(&self.room, new)
            .await
            .expect("subscription")
            .subscription
            .id
    }

    /// A publish of `{}` to the Room's event type, by its administrator.
    pub(crate) fn event(&self) -> PublishRequest {
        PublishRequest::new(
            self.room.clone(),
            self.ty.clone(),
            self.admin.clone(),
            b"{}".to_vec(),
        )
    }
}
