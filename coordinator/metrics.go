package coordinator

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	leader           prometheus.Gauge
	pending          prometheus.Gauge
	placements       prometheus.Counter
	conflicts        prometheus.Counter
	placementSeconds prometheus.Histogram
	roundSeconds     prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "herd_coordinator_leader", Help: "1 while this replica is the leader.",
		}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "herd_coordinator_pending_vms", Help: "Valid VMs that fit on no node at the last round.",
		}),
		placements: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_coordinator_placements_total", Help: "First placements committed.",
		}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_coordinator_txn_conflicts_total", Help: "Leader writes refused because the object changed since it was read.",
		}),
		placementSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "herd_coordinator_placement_seconds", Help: "From a new spec seen to its placement committed.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 14),
		}),
		roundSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "herd_coordinator_round_seconds", Help: "One scheduling round, from snapshot to commit.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 14),
		}),
	}
	reg.MustRegister(m.leader, m.pending, m.placements, m.conflicts, m.placementSeconds, m.roundSeconds)
	return m
}
