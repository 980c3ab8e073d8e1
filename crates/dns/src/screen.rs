//! What every packet goes through before anything answers it: a response (QR=1) is dropped,
//! never answered (one forged packet from 127.0.0.1:53 to 127.0.0.1:53 made the server answer
//! itself 316,000 times in 3 s); a query that is not well-formed (not exactly one question,
//! a compression pointer in the question or one that does not point back at earlier data,
//! records that run past the end, trailing bytes) gets a FORMERR of a bare header, which is
//! itself well-formed, and nothing of it is echoed.

const HEADER: usize = 12;

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A well-formed query; where its OPT record's RDATA is, if it has one (found on the way,
    /// so that nothing walks the packet again for its cookie).
    Answer { opt: Option<(usize, usize)> },
    /// Not a query (a response, or shorter than a header): no reply at all.
    Drop(&'static str),
    /// A query that is not well-formed: FORMERR.
    FormErr(&'static str),
}

pub(crate) fn screen(msg: &[u8]) -> Verdict {
    if msg.len() < HEADER {
        return Verdict::Drop("short");
    }
    if msg[2] & 0x80 != 0 {
        return Verdict::Drop("response");
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([msg[i], msg[i + 1]]));
    if count(4) != 1 {
        return Verdict::FormErr("question count");
    }
    let records = count(6) + count(8) + count(10);
    let Some(mut at) = name_end(msg, HEADER, false) else {
        return Verdict::FormErr("question name");
    };
    at += 4;
    if at > msg.len() {
        return Verdict::FormErr("question");
    }
    let mut opt = None;
    for _ in 0..records {
        let Some(end) = name_end(msg, at, true) else {
            return Verdict::FormErr("record name");
        };
        // TYPE CLASS TTL RDLENGTH, then RDATA.
        let Some(fixed) = msg.get(end..end + 10) else {
            return Verdict::FormErr("record");
        };
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let rdata = end + 10;
        at = rdata + rdlen;
        if at > msg.len() {
            return Verdict::FormErr("record data");
        }
        if u16::from_be_bytes([fixed[0], fixed[1]]) == 41 {
            opt = Some((rdata, at));
        }
    }
    if at != msg.len() {
        return Verdict::FormErr("trailing bytes");
    }
    Verdict::Answer { opt }
}

/// Cuts an answer back to its last whole record and sets its counts to the records it then
/// holds; returns whether an OPT record is among them. (hickory's encoder, out of room,
/// leaves part of a record behind and counts it.)
pub(crate) fn keep_whole_records(msg: &mut Vec<u8>) -> bool {
    if msg.len() < HEADER {
        return false;
    }
    let count = |m: &[u8], i: usize| usize::from(u16::from_be_bytes([m[i], m[i + 1]]));
    let mut at = HEADER;
    for _ in 0..count(msg, 4) {
        match name_end(msg, at, true) {
            Some(end) if end + 4 <= msg.len() => at = end + 4,
            _ => return false,
        }
    }
    let wanted = [count(msg, 6), count(msg, 8), count(msg, 10)];
    let mut kept = [0u16; 3];
    let mut has_opt = false;
    'sections: for (section, want) in wanted.into_iter().enumerate() {
        for _ in 0..want {
            let Some(end) = name_end(msg, at, true) else {
                break 'sections;
            };
            let Some(fixed) = msg.get(end..end + 10) else {
                break 'sections;
            };
            let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
            let next = end + 10 + usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
            if next > msg.len() {
                break 'sections;
            }
            has_opt |= rtype == 41;
            kept[section] += 1;
            at = next;
        }
    }
    msg.truncate(at);
    for (i, n) in kept.into_iter().enumerate() {
        msg[6 + 2 * i..8 + 2 * i].copy_from_slice(&n.to_be_bytes());
    }
    if kept.iter().map(|n| usize::from(*n)).sum::<usize>() < wanted.iter().sum::<usize>() {
        msg[2] |= 0x02; // TC
    }
    has_opt
}

/// The RDATA of a screened query's OPT record, if it has one.
pub(crate) fn opt_rdata(msg: &[u8]) -> Option<&[u8]> {
    let count = |i: usize| usize::from(u16::from_be_bytes([msg[i], msg[i + 1]]));
    if msg.len() < HEADER {
        return None;
    }
    let records = count(6) + count(8) + count(10);
    let mut at = name_end(msg, HEADER, false)? + 4;
    for _ in 0..records {
        let end = name_end(msg, at, true)?;
        let fixed = msg.get(end..end + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let rdata = msg.get(end + 10..end + 10 + rdlen)?;
        if rtype == 41 {
            return Some(rdata);
        }
        at = end + 10 + rdlen;
    }
    None
}

/// Where the name at `start` ends. A pointer may end a name only where `pointers` allows it,
/// and only to a name that starts earlier in the message, after the header.
fn name_end(msg: &[u8], start: usize, pointers: bool) -> Option<usize> {
    let mut at = start;
    let mut len = 0usize;
    loop {
        let b = *msg.get(at)?;
        match b & 0xc0 {
            0x00 => {
                at += 1;
                if b == 0 {
                    return Some(at);
                }
                len += usize::from(b) + 1;
                if len > 255 {
                    return None;
                }
                at += usize::from(b);
            }
            0xc0 if pointers => {
                let target = usize::from(u16::from_be_bytes([b & 0x3f, *msg.get(at + 1)?]));
                if target < HEADER || target >= start {
                    return None;
                }
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// A FORMERR answer to `query`: its id, opcode and RD, no question, no records.
pub(crate) fn formerr(query: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&query[..2]);
    // QR=1, the query's opcode and RD; RCODE 1.
    out.push(0x80 | (query[2] & 0x79));
    out.push(0x01);
    out.extend_from_slice(&[0; 8]);
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;

    fn query() -> Vec<u8> {
        let mut msg = Message::new(0x1234, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(
            Name::from_ascii("web.marathon.mesos.").unwrap(),
            RecordType::A,
        ));
        msg.to_vec().unwrap()
    }

    #[test]
    fn a_plain_query_passes_and_with_edns_too() {
        assert_eq!(screen(&query()), Verdict::Answer { opt: None });
        let mut msg = Message::from_vec(&query()).unwrap();
        let mut edns = hickory_proto::op::Edns::new();
        edns.set_max_payload(1232);
        msg.set_edns(edns);
        let with_edns = msg.to_vec().unwrap();
        let Verdict::Answer {
            opt: Some((from, to)),
        } = screen(&with_edns)
        else {
            panic!("no OPT found in {with_edns:?}");
        };
        assert_eq!(to - from, 0, "an OPT without options");
        assert_eq!(opt_rdata(&with_edns), Some(&with_edns[from..to]));
    }

    #[test]
    fn responses_are_dropped_and_malformed_queries_get_formerr() {
        let q = query();
        let mut response = q.clone();
        response[2] |= 0x80;
        assert_eq!(screen(&response), Verdict::Drop("response"));
        assert_eq!(screen(&q[..11]), Verdict::Drop("short"));

        let mut trailing = q.clone();
        trailing.push(0);
        assert_eq!(screen(&trailing), Verdict::FormErr("trailing bytes"));

        let mut two = q.clone();
        two[5] = 2;
        assert_eq!(screen(&two), Verdict::FormErr("question count"));
        let mut none = q.clone();
        none[5] = 0;
        assert_eq!(screen(&none), Verdict::FormErr("question count"));

        // The question's name as a pointer into the header.
        let mut pointer = q[..HEADER].to_vec();
        pointer.extend_from_slice(&[0xc0, 0x04, 0, 1, 0, 1]);
        assert_eq!(screen(&pointer), Verdict::FormErr("question name"));

        // An additional record whose owner points forward, at itself.
        let mut forward = q.clone();
        forward[11] = 1;
        let at = forward.len() as u8;
        forward.extend_from_slice(&[0xc0, at, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 1, 2, 3, 4]);
        assert_eq!(screen(&forward), Verdict::FormErr("record name"));
        // The same record pointing back at the question's name is fine.
        let last = forward.len() - 16;
        forward[last + 1] = 12;
        assert!(matches!(screen(&forward), Verdict::Answer { .. }));
        // Its data running past the end is not.
        forward.truncate(forward.len() - 1);
        assert_eq!(screen(&forward), Verdict::FormErr("record data"));
    }

    #[test]
    fn the_formerr_reply_is_a_well_formed_message() {
        let mut q = query();
        q.push(7);
        let mut out = Vec::new();
        formerr(&q, &mut out);
        let reply = Message::from_vec(&out).expect("parses");
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert!(reply.metadata.recursion_desired);
        assert!(reply.queries.is_empty() && reply.answers.is_empty());
        assert_eq!(
            screen(&out),
            Verdict::Drop("response"),
            "never answered in turn"
        );
    }

    #[test]
    fn an_answer_is_cut_back_to_whole_records() {
        let mut msg = Message::new(1, MessageType::Response, OpCode::Query);
        let name = Name::from_ascii("a.mesos.").unwrap();
        msg.add_query(Query::query(name.clone(), RecordType::A));
        for i in 0..3 {
            msg.add_answer(hickory_proto::rr::Record::from_rdata(
                name.clone(),
                5,
                hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A::new(10, 0, 0, i)),
            ));
        }
        let whole = msg.to_vec().unwrap();
        let mut cut = whole.clone();
        cut.truncate(whole.len() - 3);
        assert!(!keep_whole_records(&mut cut));
        let reply = Message::from_vec(&cut).expect("whole records only");
        assert_eq!(reply.answers.len(), 2);
        assert!(reply.metadata.truncation);
        let mut intact = whole.clone();
        keep_whole_records(&mut intact);
        assert_eq!(intact, whole, "a whole answer is left as it is");
    }
}
