//! DNS messages: the one question of a query, and the answers the resolver
//! builds itself. Everything it does not answer is relayed upstream as raw
//! bytes (see `forward.rs`), so EDNS, DNSSEC bits and truncation pass through
//! untouched.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use std::net::IpAddr;

/// What a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    V4,
    V6,
    /// Any other type (MX, TXT, PTR, ...): answered for our names with no
    /// records, forwarded for the rest.
    Other,
}

/// A parsed standard query with exactly one question.
#[derive(Debug)]
pub struct Query {
    message: Message,
    /// Lower case, without the trailing dot.
    pub name: String,
    pub kind: Kind,
}

/// Why a packet is not a query we can act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Unusable {
    /// Not even a header: drop it, there is nothing to answer to.
    Garbage,
    /// A readable header but not a standard one-question query: answer with
    /// this code.
    Refuse(u16, ResponseCode),
}

/// Parse a query. Responses, other opcodes and multi-question messages are
/// refused with the code a resolver gives them.
pub fn parse(bytes: &[u8]) -> Result<Query, Unusable> {
    let message = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => {
            return Err(match header_id(bytes) {
                Some(id) => Unusable::Refuse(id, ResponseCode::FormErr),
                None => Unusable::Garbage,
            })
        }
    };
    if message.message_type() != MessageType::Query {
        return Err(Unusable::Garbage);
    }
    if message.op_code() != OpCode::Query {
        return Err(Unusable::Refuse(message.id(), ResponseCode::NotImp));
    }
    if message.queries().len() != 1 {
        return Err(Unusable::Refuse(message.id(), ResponseCode::FormErr));
    }
    let question = &message.queries()[0];
    let kind = match question.query_type() {
        RecordType::A => Kind::V4,
        RecordType::AAAA => Kind::V6,
        _ => Kind::Other,
    };
    let name = question.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.').to_string();
    Ok(Query {
        message,
        name,
        kind,
    })
}

fn header_id(bytes: &[u8]) -> Option<u16> {
    (bytes.len() >= 12).then(|| u16::from_be_bytes([bytes[0], bytes[1]]))
}

impl Query {
    pub fn id(&self) -> u16 {
        self.message.id()
    }

    /// The largest UDP answer the client takes: 512 bytes, or what its EDNS
    /// option says.
    pub fn udp_limit(&self) -> usize {
        self.message
            .extensions()
            .as_ref()
            .map_or(512, |e| e.max_payload().max(512) as usize)
    }

    /// [`Query::answer`], or, when that is longer than `limit`, an empty
    /// answer with the TC bit: the client asks again over TCP (an alias
    /// held by many containers does not fit 512 bytes).
    pub fn answer_within(&self, addrs: &[IpAddr], ttl: u32, limit: usize) -> Vec<u8> {
        let full = self.answer(addrs, ttl);
        if full.len() <= limit {
            return full;
        }
        let mut truncated = self.response(ResponseCode::NoError);
        truncated.set_authoritative(true).set_truncated(true);
        encode(&truncated, self.id())
    }

    /// The answer for a name we hold: the addresses of the asked family, or
    /// none (NOERROR, no data) when the name has only the other family.
    pub fn answer(&self, addrs: &[IpAddr], ttl: u32) -> Vec<u8> {
        let mut response = self.response(ResponseCode::NoError);
        response.set_authoritative(true);
        let name = self.message.queries()[0].name().clone();
        for addr in addrs {
            let rdata = match (self.kind, addr) {
                (Kind::V4, IpAddr::V4(v4)) => RData::A(A(*v4)),
                (Kind::V6, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            response.add_answer(Record::from_rdata(name.clone(), ttl, rdata));
        }
        encode(&response, self.id())
    }

    /// An answer with no records and this code (SERVFAIL when no upstream
    /// answered, REFUSED when too many queries are in flight).
    pub fn failure(&self, code: ResponseCode) -> Vec<u8> {
        encode(&self.response(code), self.id())
    }

    fn response(&self, code: ResponseCode) -> Message {
        let mut response = Message::new();
        response
            .set_id(self.message.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(self.message.recursion_desired())
            .set_recursion_available(true)
            .set_checking_disabled(self.message.checking_disabled())
            .set_response_code(code);
        response.add_queries(self.message.queries().iter().cloned());
        response
    }
}

/// A bare error reply for a packet that is not a usable query.
pub fn refusal(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut response = Message::error_msg(id, OpCode::Query, code);
    response.set_recursion_available(true);
    encode(&response, id)
}

/// Encoding a message we built ourselves only fails on a bug; fall back to a
/// bare SERVFAIL header so the client never waits for a timeout.
fn encode(message: &Message, id: u16) -> Vec<u8> {
    message.to_vec().unwrap_or_else(|e| {
        tracing::error!(error = %e, "could not encode a DNS answer");
        let mut header = vec![0u8; 12];
        header[..2].copy_from_slice(&id.to_be_bytes());
        header[2] = 0x80; // QR
        header[3] = 0x80 | 2; // RA, SERVFAIL
        header
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hickory_proto::op::Query as Question;
    use hickory_proto::rr::Name;

    pub(crate) fn query_bytes(name: &str, kind: RecordType, id: u16) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true);
        m.add_query(Question::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).unwrap()
    }

    #[test]
    fn a_query_is_read_in_lower_case_without_the_root_dot() {
        let q = parse(&query_bytes("Web.AppNet.", RecordType::A, 7)).unwrap();
        assert_eq!(q.name, "web.appnet");
        assert_eq!(q.kind, Kind::V4);
        assert_eq!(q.id(), 7);
        let q = parse(&query_bytes("db", RecordType::MX, 8)).unwrap();
        assert_eq!(q.kind, Kind::Other);
    }

    #[test]
    fn answers_carry_only_the_asked_family_with_the_ttl() {
        let addrs: Vec<IpAddr> = vec!["10.77.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        let q = parse(&query_bytes("web", RecordType::A, 1)).unwrap();
        let m = decode(&q.answer(&addrs, 2));
        assert_eq!(m.id(), 1);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.authoritative());
        assert_eq!(m.answers().len(), 1);
        assert_eq!(m.answers()[0].ttl(), 2);
        assert_eq!(
            m.answers()[0].data(),
            &RData::A(A("10.77.0.2".parse().unwrap()))
        );

        let q = parse(&query_bytes("web", RecordType::AAAA, 2)).unwrap();
        let m = decode(&q.answer(&addrs[..1], 2));
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.answers().is_empty(), "a v4-only name has no AAAA data");
    }

    #[test]
    fn an_answer_too_long_for_udp_is_truncated_for_a_retry_over_tcp() {
        let addrs: Vec<IpAddr> = (1..=60).map(|i| IpAddr::from([10, 77, 0, i])).collect();
        let q = parse(&query_bytes("front", RecordType::A, 4)).unwrap();
        assert_eq!(q.udp_limit(), 512);
        let m = decode(&q.answer_within(&addrs, 2, q.udp_limit()));
        assert!(m.truncated());
        assert!(m.answers().is_empty());
        let m = decode(&q.answer_within(&addrs, 2, u16::MAX as usize));
        assert!(!m.truncated());
        assert_eq!(m.answers().len(), 60);
    }

    #[test]
    fn what_is_not_a_query_is_refused_or_dropped() {
        assert_eq!(parse(&[1, 2, 3]).unwrap_err(), Unusable::Garbage);
        let mut junk = vec![0xab, 0xcd];
        junk.extend([0xff; 20]);
        assert!(matches!(
            parse(&junk).unwrap_err(),
            Unusable::Refuse(0xabcd, _) | Unusable::Garbage
        ));
        let mut m = decode(&query_bytes("web", RecordType::A, 3));
        m.set_message_type(MessageType::Response);
        assert_eq!(
            parse(&m.to_vec().unwrap()).unwrap_err(),
            Unusable::Garbage,
            "a response sent to us is never answered (no reflection loops)"
        );
        let r = decode(&refusal(9, ResponseCode::FormErr));
        assert_eq!((r.id(), r.response_code()), (9, ResponseCode::FormErr));
    }
}
