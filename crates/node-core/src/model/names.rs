//! The one label-cleaning rule (Mesos-DNS's), used by every DNS name and every VIP name, so
//! that the name a VIP is stored under and the name DNS answers can never disagree.

/// Mesos-DNS label cleaning: lower case; `-`, `.` and `_` become `-`; anything else outside
/// `[a-z0-9]` is dropped; at most 63 characters; no `-` at either end.
pub fn clean_label(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .filter_map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => Some(c),
            '-' | '.' | '_' => Some('-'),
            _ => None,
        })
        .collect();
    out.truncate(63);
    out.trim_matches('-').to_string()
}

/// A named VIP's label: the name without its slashes (`/mygroup/myapp` -> `mygroupmyapp`),
/// cleaned, as dcos-l4lb does. It is both the VIP's store key and its DNS label.
pub fn vip_label(name: &str) -> String {
    clean_label(&name.replace('/', ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_follows_mesos_dns() {
        assert_eq!(clean_label("Web_App.v2"), "web-app-v2");
        assert_eq!(clean_label("-a$b-"), "ab");
        assert_eq!(clean_label(&"x".repeat(70)).len(), 63);
        assert_eq!(
            clean_label(&format!("{}-y", "x".repeat(62))),
            "x".repeat(62)
        );
        assert_eq!(vip_label("/mygroup/myapp"), "mygroupmyapp");
        assert_eq!(vip_label("/a/bc"), vip_label("/ab/c"));
        assert_eq!(vip_label("/my_app"), vip_label("/my-app"));
    }
}
