//! [`metric_set!`](crate::metric_set): a node's metrics, each declared once.

/// Declares a node's metrics, each once: its name as a constant, its help
/// text (described to the recorder when the set is made), and, for a
/// metric without labels, its handle as a field of the set, resolved once
/// by `new()`. A labelled metric gets its constant and description only;
/// its labels are the caller's (`counter!(NAME, "reason" => r)`).
///
/// ```ignore
/// comsat_node::metric_set! {
///     /// Metric handles, resolved once.
///     pub struct Metrics {
///         /// Flows opened.
///         pub(crate) flows: Counter = FLOWS_TOTAL("comsat_x_flows_total", "Flows opened"),
///     }
///     labelled {
///         /// Refusals, by reason.
///         Counter REFUSED_TOTAL("comsat_x_refused_total", "Refusals, by reason"),
///     }
/// }
/// ```
///
/// The calling crate depends on `metrics`.
#[macro_export]
macro_rules! metric_set {
    (
        $(#[$meta:meta])*
        $vis:vis struct $set:ident {
            $(
                $(#[doc = $doc:literal])*
                $fvis:vis $field:ident : $kind:ident = $name:ident($metric:literal, $help:literal),
            )*
        }
        labelled {
            $(
                $(#[doc = $ldoc:literal])*
                $lkind:ident $lname:ident($lmetric:literal, $lhelp:literal),
            )*
        }
    ) => {
        $(
            $(#[doc = $doc])*
            pub const $name: &str = $metric;
        )*
        $(
            $(#[doc = $ldoc])*
            pub const $lname: &str = $lmetric;
        )*

        $(#[$meta])*
        #[derive(Clone)]
        $vis struct $set {
            $(
                $(#[doc = $doc])*
                $fvis $field: ::metrics::$kind,
            )*
        }

        impl $set {
            /// Describes every metric of the set and resolves the handles.
            $vis fn new() -> Self {
                $( $crate::metric_set!(@describe $kind $name, $help); )*
                $( $crate::metric_set!(@describe $lkind $lname, $lhelp); )*
                Self {
                    $( $field: $crate::metric_set!(@handle $kind $name), )*
                }
            }
        }

        impl ::std::fmt::Debug for $set {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(stringify!($set))
            }
        }
    };
    (@describe Counter $name:ident, $help:literal) => {
        ::metrics::describe_counter!($name, $help)
    };
    (@describe Gauge $name:ident, $help:literal) => {
        ::metrics::describe_gauge!($name, $help)
    };
    (@describe Histogram $name:ident, $help:literal) => {
        ::metrics::describe_histogram!($name, $help)
    };
    (@handle Counter $name:ident) => {
        ::metrics::counter!($name)
    };
    (@handle Gauge $name:ident) => {
        ::metrics::gauge!($name)
    };
    (@handle Histogram $name:ident) => {
        ::metrics::histogram!($name)
    };
}
