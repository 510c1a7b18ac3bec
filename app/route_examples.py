"""Built-in labelled prompts for the learned task router, one list per task category.

``code``: writing, fixing, explaining or reviewing code; ``reasoning``: analysis, proofs, planning,
multi-step problems; ``long``: work over a long text the prompt carries (summaries, extraction,
questions about a document); ``general``: everyday requests (chat, short facts, translation,
rewording). A config's examples add to these (see :mod:`app.classifier`).
"""

from __future__ import annotations

CODE = "code"
REASONING = "reasoning"
LONG = "long"
GENERAL = "general"

BUILT_IN: dict[str, tuple[str, ...]] = {
    CODE: (
        "write a python function that parses a CSV file and returns a list of dicts",
        "fix this stack trace: TypeError: 'NoneType' object is not subscriptable",
        "Refactor this JavaScript class to use async/await instead of callbacks",
        "Why does my Rust code fail to compile with 'borrowed value does not live long enough'?",
        "Write a SQL query that returns the top 5 customers by total order value",
        "Implement a binary search tree with insert and delete in Java",
        "Add type hints and docstrings to this Python module",
        "My React component re-renders on every keystroke, how do I fix it?",
        "Write unit tests with pytest for the function below",
        "Convert this bash script to a Makefile target",
        "What does this regex do: ^(?=.*\\d)(?=.*[a-z]).{8,}$",
        "Write a Dockerfile for a Node.js app that runs on port 3000",
        "Segmentation fault when freeing a linked list in C, here is my code",
        "Create a REST endpoint in FastAPI that uploads a file to S3",
        "Review this pull request diff and point out bugs",
        "How do I use a goroutine and a channel to fan out HTTP requests in Go?",
        "Write a Kubernetes deployment YAML with two replicas and a readiness probe",
        "def merge(a, b):\n    return a + b\n# make this merge two sorted lists in linear time",
        "Explain what this TypeScript generic type does: type DeepPartial<T> = { [K in keyof T]?: DeepPartial<T[K]> }",
        "Optimize this pandas code, it takes minutes on 10 million rows",
        "Write a GitHub Actions workflow that runs tests on every push",
        "Implement an LRU cache in C++ with O(1) get and put",
        "The build fails with 'ModuleNotFoundError: No module named app', what is wrong with my setup.py?",
        "Write a shell one-liner that finds the 10 largest files under a directory",
        "Port this Python class to idiomatic Kotlin",
        "How do I mock a database call in a Jest test?",
        "Write a function to validate an email address without using regex",
        "Debug this: the for loop never terminates when i is unsigned",
        "Generate a migration in Alembic that adds a nullable column",
        "Write a websocket server in Python that broadcasts messages to all clients",
    ),
    REASONING: (
        "analyze the trade-offs between microservices and a monolith for a five-person startup",
        "prove that the square root of 2 is irrational",
        "A bat and a ball cost $1.10 in total; the bat costs $1 more than the ball. How much is the ball? Explain step by step.",
        "If all bloops are razzies and some razzies are lazzies, can we conclude that some bloops are lazzies?",
        "Compare the long-term economic effects of a carbon tax and cap-and-trade",
        "Plan a migration of a 2 TB PostgreSQL database to a new region with under five minutes of downtime",
        "Three people check into a hotel room that costs $30; explain the missing dollar riddle",
        "What are the strongest arguments for and against universal basic income?",
        "Solve for x: 3x^2 - 12x + 9 = 0, and show your reasoning",
        "Estimate how many piano tuners work in Chicago, explaining each assumption",
        "Why did the Roman Republic collapse? Weigh the competing explanations.",
        "Design an experiment to test whether a new fertilizer increases crop yield",
        "Given these quarterly numbers, should the company expand into Europe next year? Reason it through.",
        "Prove by induction that the sum of the first n odd numbers is n squared",
        "What would happen to global shipping if the Suez Canal closed for a year? Think through the consequences.",
        "Evaluate the ethical implications of using facial recognition in public schools",
        "Which sorting algorithm should a database use for external sorting and why?",
        "A train leaves at 3 pm at 60 mph and another at 4 pm at 80 mph; when does the second catch up?",
        "Critique the argument that correlation between ice cream sales and drownings shows causation",
        "Work out the expected value of this game: roll two dice, win the product, pay 12 to play",
        "Decide between renting and buying a house given these interest rates and prices, step by step",
        "Why is the halting problem undecidable? Walk through the proof.",
        "Assess the risks of this investment portfolio and suggest a rebalancing strategy",
        "How many ways can 8 queens be placed on a chessboard so none attack each other? Explain the method.",
        "What are the second-order effects of remote work on city real estate markets?",
        "Explain whether P equals NP would break modern cryptography, with reasoning",
        "Diagnose why our monthly active users dropped 20% after the redesign, considering all hypotheses",
        "Is it rational to buy lottery tickets? Use decision theory.",
        "Break down the causes of the 2008 financial crisis and rank them by importance",
        "Find the flaw in this proof that 1 = 2",
    ),
    LONG: (
        (
            "Summarize the following report in five bullet points.\n\n"
            "Executive summary. Over the past fiscal year the division grew revenue across every region while operating costs rose faster than planned..."
        ),
        (
            "Here is the full transcript of our two-hour meeting. Extract every action item with its owner and due date.\n\n"
            "Transcript:\nAlice: Let's start with the roadmap review..."
        ),
        (
            "Read this contract and list every clause that limits the supplier's liability.\n\n"
            "MASTER SERVICES AGREEMENT\n1. Definitions. In this Agreement the following terms have the meanings set out below..."
        ),
        (
            "Below is a research paper. Write an abstract of at most 150 words.\n\n"
            "1 Introduction\nLarge-scale distributed systems increasingly rely on consensus protocols..."
        ),
        (
            "Answer the questions using only the document below.\n\n"
            "Document:\nThe city council met on March 3 to discuss the annual budget, the new transit plan and..."
        ),
        (
            "Condense these customer support chat logs into a list of recurring complaints.\n\n"
            "[Chat 1] Customer: my order never arrived... [Chat 2] Customer: the app crashes when..."
        ),
        "Here are the minutes of the last twelve board meetings. Produce a timeline of the decisions made.",
        (
            "Translate the whole of this 20-page user manual into French, keeping the headings.\n\n"
            "Chapter 1. Getting started. Unpack the device and check that the following parts are included..."
        ),
        "Go through this long email thread and tell me what the client finally agreed to.\n\nFrom: Mark\nSent: Monday\nSubject: RE: RE: RE: proposal...",
        (
            "This is the text of a novel's first three chapters. Describe each character and how they relate.\n\n"
            "Chapter One\nThe rain had not stopped for three days when Eleanor arrived at the house..."
        ),
        "Summarize each section of the attached policy document in one sentence.\n\nSection 1: Purpose. This policy establishes the requirements for...",
        "Extract all dates, amounts and parties from this 30-page lease agreement.",
        (
            "Here is a long log file from our server. Find the errors and explain what happened before the crash.\n\n"
            "2026-03-01 10:00:01 INFO starting worker\n2026-03-01 10:00:02 INFO connected..."
        ),
        (
            "Compare the two versions of the terms of service pasted below and list what changed.\n\n"
            "Version A:\n1. Acceptance of terms...\n\nVersion B:\n1. Acceptance of terms..."
        ),
        (
            "Write a detailed summary of this book chapter for a study guide.\n\n"
            "The industrial revolution began in Britain in the late eighteenth century, when..."
        ),
        "Using the 50 pages of interview notes below, identify the main themes the participants raised.",
        "Create a table of contents for the following long article, with a one-line description for each part.",
        (
            "Proofread this entire thesis chapter and list the grammar mistakes by paragraph.\n\n"
            "Chapter 3: Methodology\n3.1 Research design\nThis study adopts a mixed-methods approach..."
        ),
        (
            "Here is a quarterly earnings call transcript. What did management say about margins and guidance?\n\n"
            "Operator: Good afternoon and welcome to the third quarter earnings call..."
        ),
        (
            "Below are 200 product reviews. Summarize what customers like and dislike.\n\n"
            "Review 1: Great battery life but the screen scratches easily. Review 2: ..."
        ),
        "Read the following legal judgment and state the holding and the reasoning of the court.\n\nIN THE SUPREME COURT...",
        (
            "Digest this long technical specification and list all the requirements marked as mandatory.\n\n"
            "1. Scope\nThis specification defines the interface between..."
        ),
        "The following is a full podcast transcript. Write show notes with timestamps.\n\n[00:00] Host: Welcome back to the show...",
        "Answer based on the documentation pasted below: how do I configure single sign-on?\n\nAdministration Guide\nChapter 7 Authentication\n7.1 Overview...",
        "Here's my whole codebase's README, CHANGELOG and design doc. Summarize how the project evolved.",
    ),
    GENERAL: (
        "hello, how are you?",
        "translate this sentence into German: the weather is lovely today",
        "What is the capital of Australia?",
        "Give me a recipe for banana bread",
        "Write a short birthday message for my sister",
        "What time zone is Tokyo in?",
        "Suggest five names for a golden retriever puppy",
        "Rewrite this sentence to sound more polite: send me the file now",
        "Who wrote Pride and Prejudice?",
        "How many grams are in a pound?",
        "Tell me a fun fact about octopuses",
        "What's a good movie to watch tonight?",
        "Write a haiku about autumn",
        "Thanks, that was helpful!",
        "Fix the spelling in this sentence: I recieved the pakage yesterday",
        "What does 'serendipity' mean?",
        "Recommend a few books similar to The Hobbit",
        "How do I boil an egg?",
        "Write a tweet announcing our new coffee shop opening",
        "What's the difference between affect and effect?",
        "Give me three ideas for a rainy day with kids",
        "Summarize in one sentence: the meeting is moved to Friday at 10.",
        "Say good morning in Spanish, French and Italian",
        "What is the boiling point of water at sea level?",
        "Draft a short reply declining a meeting invitation",
        "Can you recommend a stretching routine for the morning?",
        "What's the plural of cactus?",
        "Tell me a joke about cats",
        "Convert 30 degrees Celsius to Fahrenheit",
        "Write a thank-you note to a colleague who helped me move",
    ),
}
