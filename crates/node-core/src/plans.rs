//! Marathon's deployment plans, built from dcnet's per-app deployments: a change of one app
//! is a plan of one step; a group change (`/v2/groups`) writes one deployment per app, all
//! under one plan id, and its steps follow the dependencies among them (`after`). Pure: the
//! API, the events and the CLI's view all read plans through here.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::model::{Deployment, DeploymentId, DeploymentKind, DeploymentStatus};
use crate::state::ClusterState;

/// Marathon's name for what a deployment does to its app.
pub fn action(kind: DeploymentKind) -> &'static str {
    match kind {
        DeploymentKind::Create => "StartApplication",
        DeploymentKind::Update | DeploymentKind::Restart => "RestartApplication",
        DeploymentKind::Scale => "ScaleApplication",
        DeploymentKind::Delete => "StopApplication",
    }
}

/// One plan: its id and its deployments, oldest app first.
#[derive(Debug)]
pub struct Plan<'a> {
    pub id: DeploymentId,
    pub members: Vec<&'a Deployment>,
}

impl<'a> Plan<'a> {
    /// The plan `id` names in `state`, if any deployment is part of it.
    pub fn of(state: &'a ClusterState, id: &DeploymentId) -> Option<Self> {
        if let Some(d) = state.deployments.get(id)
            && d.plan.is_none()
        {
            return Some(Plan {
                id: id.clone(),
                members: vec![&**d],
            });
        }
        let members: Vec<&Deployment> = state
            .deployments
            .values()
            .filter(|d| d.plan.as_ref() == Some(id))
            .map(|d| &**d)
            .collect();
        (!members.is_empty()).then(|| Plan {
            id: id.clone(),
            members,
        })
    }

    /// Every plan of `state` with a running deployment, oldest first.
    pub fn running(state: &'a ClusterState) -> Vec<Self> {
        let mut by_plan: BTreeMap<&DeploymentId, Vec<&Deployment>> = BTreeMap::new();
        for d in state.deployments.values() {
            by_plan.entry(d.plan_id()).or_default().push(d);
        }
        let mut plans: Vec<Plan<'_>> = by_plan
            .into_iter()
            .filter(|(_, m)| m.iter().any(|d| !d.status.is_done()))
            .map(|(id, members)| Plan {
                id: id.clone(),
                members,
            })
            .collect();
        plans.sort_by(|a, b| a.started_at().cmp(b.started_at()));
        plans
    }

    pub fn started_at(&self) -> &str {
        self.members
            .iter()
            .map(|d| d.started_at.as_str())
            .min()
            .unwrap_or_default()
    }

    pub fn version(&self) -> &str {
        self.members
            .iter()
            .map(|d| d.version.as_str())
            .max()
            .unwrap_or_default()
    }

    /// The group the plan changed, as Marathon's `group_change_*` events name it: the
    /// deepest group that holds every app of the plan.
    pub fn group(&self) -> String {
        let mut ids = self.members.iter().map(|d| d.app_id.as_str());
        let Some(first) = ids.next() else {
            return "/".into();
        };
        let mut common: Vec<&str> = first.split('/').filter(|s| !s.is_empty()).collect();
        // An app's own name is not a group.
        common.pop();
        for id in ids {
            let parts: Vec<&str> = id.split('/').filter(|s| !s.is_empty()).collect();
            let groups = &parts[..parts.len().saturating_sub(1)];
            let same = common
                .iter()
                .zip(groups)
                .take_while(|(a, b)| a == b)
                .count();
            common.truncate(same);
        }
        format!("/{}", common.join("/"))
    }

    /// The plan's steps: each deployment's step is one past the latest of its `after` in the
    /// plan (dependency cycles are refused before anything is stored; a bound on the depth
    /// keeps a corrupt record from looping).
    pub fn steps(&self) -> Vec<Vec<&'a Deployment>> {
        fn level(
            d: &Deployment,
            members: &[&Deployment],
            depth: usize,
            memo: &mut BTreeMap<DeploymentId, usize>,
        ) -> usize {
            if let Some(l) = memo.get(&d.id) {
                return *l;
            }
            let l = if depth > members.len() {
                0
            } else {
                d.after
                    .iter()
                    .filter_map(|a| members.iter().find(|m| &m.app_id == a))
                    .map(|m| level(m, members, depth + 1, memo) + 1)
                    .max()
                    .unwrap_or(0)
            };
            memo.insert(d.id.clone(), l);
            l
        }
        let mut memo = BTreeMap::new();
        let mut steps: Vec<Vec<&Deployment>> = Vec::new();
        for d in &self.members {
            let l = level(d, &self.members, 0, &mut memo);
            if steps.len() <= l {
                steps.resize_with(l + 1, Vec::new);
            }
            steps[l].push(d);
        }
        for step in &mut steps {
            step.sort_by(|a, b| a.app_id.cmp(&b.app_id));
        }
        steps.retain(|s| !s.is_empty());
        steps
    }

    /// The index of the first step with a running deployment (0-based); the last when all
    /// have ended.
    pub fn current_step(&self) -> usize {
        let steps = self.steps();
        steps
            .iter()
            .position(|s| s.iter().any(|d| !d.status.is_done()))
            .unwrap_or(steps.len().saturating_sub(1))
    }

    /// Where the plan stands: running while any of its deployments runs; then failed if
    /// one failed, superseded if one was, succeeded otherwise.
    pub fn status(&self) -> DeploymentStatus {
        let any = |s: DeploymentStatus| self.members.iter().any(|d| d.status == s);
        if any(DeploymentStatus::Running) {
            DeploymentStatus::Running
        } else if any(DeploymentStatus::Failed) {
            DeploymentStatus::Failed
        } else if any(DeploymentStatus::Superseded) {
            DeploymentStatus::Superseded
        } else {
            DeploymentStatus::Succeeded
        }
    }

    /// Marathon's `DeploymentPlan` (`id`, `version`, `steps`), as in the events.
    pub fn marathon(&self) -> Value {
        json!({"id": self.id, "version": self.version(), "steps": steps_json(&self.steps())})
    }

    /// Marathon's `DeploymentStepInfo`, as `GET /v2/deployments` lists it.
    pub fn step_info(&self, state: &ClusterState) -> Value {
        let steps = self.steps();
        let current = self.current_step();
        let current_actions: Vec<Value> = steps
            .get(current)
            .into_iter()
            .flatten()
            .filter(|d| !d.status.is_done())
            .map(|d| {
                json!({
                    "action": action(d.kind),
                    "app": d.app_id,
                    "readinessCheckResults": readiness(d, state),
                })
            })
            .collect();
        let mut apps: Vec<&str> = self.members.iter().map(|d| d.app_id.as_str()).collect();
        apps.sort_unstable();
        json!({
            "id": self.id,
            "version": self.version(),
            "affectedApps": apps,
            "affectedPods": [],
            "steps": steps_json(&steps),
            "currentActions": current_actions,
            "currentStep": current + 1,
            "totalSteps": steps.len(),
        })
    }

    /// The plan as dcnet's own `/v1/deployments/{id}` shows it: a plan of one deployment is
    /// that deployment; a group change sums its deployments' progress and lists them.
    pub fn detail(&self) -> Value {
        if let [only] = self.members.as_slice()
            && only.plan.is_none()
        {
            return json!(only);
        }
        let sum = |f: fn(&Deployment) -> u32| self.members.iter().map(|d| f(d)).sum::<u32>();
        let status = self.status();
        let reason = self
            .members
            .iter()
            .find_map(|d| d.reason.as_ref().map(|r| format!("{}: {r}", d.app_id)));
        let finished_at = (status.is_done())
            .then(|| {
                self.members
                    .iter()
                    .filter_map(|d| d.finished_at.clone())
                    .max()
            })
            .flatten();
        let apps: Vec<&str> = self.members.iter().map(|d| d.app_id.as_str()).collect();
        let steps: Vec<Vec<&str>> = self
            .steps()
            .iter()
            .map(|s| s.iter().map(|d| d.app_id.as_str()).collect())
            .collect();
        json!({
            "id": self.id,
            "appId": apps.join(","),
            "kind": "group",
            "version": self.version(),
            "status": status,
            "reason": reason,
            "startedAt": self.started_at(),
            "finishedAt": finished_at,
            "targetInstances": sum(|d| d.target_instances),
            "healthyNew": sum(|d| d.healthy_new),
            "oldRemaining": sum(|d| d.old_remaining),
            "failedNew": sum(|d| d.failed_new),
            "steps": steps,
            "deployments": self.members,
        })
    }
}

fn steps_json(steps: &[Vec<&Deployment>]) -> Value {
    json!(
        steps
            .iter()
            .map(|s| json!({"actions": s
                .iter()
                .map(|d| json!({"action": action(d.kind), "app": d.app_id}))
                .collect::<Vec<_>>()}))
            .collect::<Vec<_>>()
    )
}

/// Marathon's `TaskReadinessCheckResult`s of the deployment's new tasks: one per check and
/// task of the version it deploys.
fn readiness(d: &Deployment, state: &ClusterState) -> Vec<Value> {
    let Some(app) = state.apps.get(&d.app_id) else {
        return Vec::new();
    };
    let current = &app.version_info.last_config_change_at;
    let tasks: Vec<&Arc<crate::model::Task>> = state
        .tasks_of(&d.app_id)
        .filter(|t| &t.version == current && t.state.is_active())
        .collect();
    app.readiness_checks
        .iter()
        .flat_map(|check| {
            tasks.iter().map(move |t| {
                json!({"name": check.name, "taskId": t.id, "ready": t.ready == Some(true)})
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AppId;

    fn dep(id: &str, app: &str, plan: Option<&str>, after: &[&str]) -> Deployment {
        Deployment {
            id: DeploymentId(id.into()),
            app_id: AppId::parse(app).unwrap(),
            kind: DeploymentKind::Create,
            version: "2026-12-03T00:00:00.000Z".into(),
            previous: None,
            status: DeploymentStatus::Running,
            reason: None,
            started_at: "2026-12-03T00:00:00.000Z".into(),
            finished_at: None,
            target_instances: 1,
            healthy_new: 0,
            old_remaining: 0,
            failed_new: 0,
            plan: plan.map(|p| DeploymentId(p.into())),
            after: after.iter().map(|a| AppId::parse(a).unwrap()).collect(),
        }
    }

    /// Steps follow `after` within the plan: /db first, then /api (after /db), then /web
    /// (after /api and /db); an `after` outside the plan orders nothing.
    #[test]
    fn steps_follow_the_dependencies_within_the_plan() {
        let members = [
            dep("1", "/g/web", Some("p"), &["/g/api", "/g/db"]),
            dep("2", "/g/api", Some("p"), &["/g/db", "/elsewhere"]),
            dep("3", "/g/db", Some("p"), &[]),
            dep("4", "/g/cache", Some("p"), &["/elsewhere"]),
        ];
        let plan = Plan {
            id: DeploymentId("p".into()),
            members: members.iter().collect(),
        };
        let steps: Vec<Vec<&str>> = plan
            .steps()
            .iter()
            .map(|s| s.iter().map(|d| d.app_id.as_str()).collect())
            .collect();
        assert_eq!(
            steps,
            [vec!["/g/cache", "/g/db"], vec!["/g/api"], vec!["/g/web"]]
        );
        assert_eq!(plan.current_step(), 0);
        let info = plan.marathon();
        assert_eq!(info["steps"].as_array().unwrap().len(), 3);
        assert_eq!(info["steps"][1]["actions"][0]["action"], "StartApplication");
    }

    /// The group a plan changed is the deepest that holds all its apps.
    #[test]
    fn a_plan_names_the_deepest_group_that_holds_its_apps() {
        let group = |apps: &[&str]| {
            let members: Vec<Deployment> = apps
                .iter()
                .enumerate()
                .map(|(i, a)| dep(&i.to_string(), a, Some("p"), &[]))
                .collect();
            Plan {
                id: DeploymentId("p".into()),
                members: members.iter().collect(),
            }
            .group()
        };
        assert_eq!(group(&["/shop/web", "/shop/db"]), "/shop");
        assert_eq!(group(&["/shop/web", "/shop/tools/cli"]), "/shop");
        assert_eq!(group(&["/a/b/web", "/a/c/db"]), "/a");
        assert_eq!(group(&["/shop/web", "/shopping/db"]), "/");
        assert_eq!(group(&["/web"]), "/");
        assert_eq!(group(&["/a/b/web"]), "/a/b");
    }

    /// A plan runs while one of its deployments does; the current step is the first with a
    /// running one; once all ended it failed if one failed.
    #[test]
    fn a_plan_ends_with_its_last_deployment() {
        let mut db = dep("1", "/db", Some("p"), &[]);
        let mut web = dep("2", "/web", Some("p"), &["/db"]);
        let status = |db: &Deployment, web: &Deployment| {
            let plan = Plan {
                id: DeploymentId("p".into()),
                members: vec![db, web],
            };
            (plan.status(), plan.current_step())
        };
        assert_eq!(status(&db, &web), (DeploymentStatus::Running, 0));
        db.status = DeploymentStatus::Succeeded;
        assert_eq!(status(&db, &web), (DeploymentStatus::Running, 1));
        web.status = DeploymentStatus::Failed;
        assert_eq!(status(&db, &web), (DeploymentStatus::Failed, 1));
        web.status = DeploymentStatus::Succeeded;
        assert_eq!(status(&db, &web), (DeploymentStatus::Succeeded, 1));
    }
}
